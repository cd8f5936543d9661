//! Models named the way the HuggingFace hub names them (`ORG/NAME[@REVISION]`), found in the
//! local hub cache that `transformers` and `huggingface-cli` fill: `models--ORG--NAME/` with
//! `refs/<revision>` holding a commit hash and `snapshots/<commit>/` holding the files. A model
//! not in the cache is downloaded into it (the `hf-hub` crate: `HF_ENDPOINT`, `HF_TOKEN`, partial
//! files resumed, a progress bar on a terminal), only the files Ferry reads.

use std::path::{Path, PathBuf};

use ferry_runtime::error::{FerryError, Result};

/// A hub model name: organisation, name and an optional revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubName {
    pub org: String,
    pub name: String,
    pub revision: Option<String>,
}

impl HubName {
    /// `ORG/NAME[@REVISION]`, or None for anything else (a path with more or fewer parts, or
    /// one starting with `.`, `/` or `~`).
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
            Some(_) => return None,
            None => (text, None),
        };
        let (org, name) = repo.split_once('/')?;
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (valid(org) && valid(name)).then(|| Self { org: org.into(), name: name.into(), revision })
    }
}

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (empty values count as
/// unset).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The snapshot folder of `name` in the hub cache `cache`.
pub fn snapshot_in(cache: &Path, name: &HubName) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}--{}", name.org, name.name));
    let label = format!("{}/{}", name.org, name.name);
    if !repo.is_dir() {
        return Err(FerryError::io(&repo, format!("{label} is not a model folder and not in the HuggingFace cache")));
    }
    let revision = name.revision.as_deref().unwrap_or("main");
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let reference = repo.join("refs").join(revision);
        let text = std::fs::read_to_string(&reference).map_err(|e| {
            FerryError::io(&reference, format!("revision {revision:?} of {label} is not in the cache: {e}"))
        })?;
        text.trim().to_string()
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.join("config.json").is_file() {
        return Err(FerryError::io(
            &snapshot,
            format!("the cached snapshot of {label} at {revision} has no config.json (an interrupted download?)"),
        ));
    }
    Ok(snapshot)
}

/// What `--model` names: an existing path as it is; otherwise a hub name from the local cache,
/// or downloaded into it; otherwise the path as given (opening it then says it does not exist).
pub fn resolve(model: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let Some(name) = model.to_str().and_then(HubName::parse) else { return Ok(model.to_path_buf()) };
    let cache = cache_dir().ok_or_else(|| {
        FerryError::io(model, "not a model folder, and no HuggingFace cache to look in (HF_HOME and HOME unset)")
    })?;
    let missing = match snapshot_in(&cache, &name) {
        Ok(snapshot) => return Ok(snapshot),
        Err(missing) => missing,
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if var("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
        return Err(FerryError::io(model, format!("{missing} (and HF_HUB_OFFLINE is set, so it is not downloaded)")));
    }
    let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    download(&cache, &name, endpoint.trim_end_matches('/')).map_err(|e| {
        FerryError::io(
            cache.join(format!("models--{}--{}", name.org, name.name)),
            format!("{}/{} is not a model folder nor in the HuggingFace cache, and downloading it from {endpoint} failed: {e}", name.org, name.name),
        )
    })
}

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The files of a repository Ferry reads: configuration, tokenizer, safetensors weights (and
/// their index). Other weight formats (`*.bin`, GGUF, `original/`) stay on the hub.
pub fn wanted(file: &str) -> bool {
    const NAMES: [&str; 6] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ];
    !file.contains('/')
        && (NAMES.contains(&file) || file.ends_with(".safetensors") || file.ends_with(".safetensors.index.json"))
}

/// Downloads what Ferry reads of `name` into the hub cache `cache` and returns the snapshot.
fn download(cache: &Path, name: &HubName, endpoint: &str) -> std::result::Result<PathBuf, String> {
    use std::io::IsTerminal;

    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::new(cache.to_path_buf()).token());
    let api = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(endpoint.to_string())
        .with_token(token)
        .with_progress(std::io::stderr().is_terminal())
        // A dropped connection resumes from the bytes already on disk.
        .with_retries(3)
        .build()
        .map_err(|e| e.to_string())?;
    let revision = name.revision.clone().unwrap_or_else(|| "main".into());
    let repo = api.repo(Repo::with_revision(format!("{}/{}", name.org, name.name), RepoType::Model, revision));
    let info = repo.info().map_err(|e| describe(&e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).filter(|f| wanted(f)).collect();
    if !files.iter().any(|f| f == "config.json") {
        return Err("the repository has no config.json".into());
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err("the repository has no *.safetensors weights (Ferry reads safetensors checkpoints)".into());
    }
    let mut snapshot = None;
    for file in &files {
        let path = repo.get(file).map_err(|e| format!("{file}: {}", describe(&e)))?;
        if file == "config.json" {
            snapshot = path.parent().map(Path::to_path_buf);
        }
    }
    snapshot.ok_or_else(|| "config.json was not written".into())
}

/// hf-hub's errors, in one line (an HTTP status says what it means for a hub).
fn describe(err: &hf_hub::api::sync::ApiError) -> String {
    use hf_hub::api::sync::ApiError;
    if let ApiError::RequestError(request) = err
        && let ureq::Error::Status(code, response) = request.as_ref()
    {
        let what = match code {
            401 | 403 => "not authorised (a gated or private model needs HF_TOKEN)",
            404 => "no such model or revision",
            _ => "refused",
        };
        return format!("{} answered {code}: {what}", response.get_url());
    }
    err.to_string().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_parse_and_paths_do_not() {
        let name = HubName::parse("allenai/OLMoE-1B-7B-0924").unwrap();
        assert_eq!((name.org.as_str(), name.name.as_str(), name.revision), ("allenai", "OLMoE-1B-7B-0924", None));
        let pinned = HubName::parse("Qwen/Qwen3-30B-A3B@v1.0").unwrap();
        assert_eq!(pinned.revision.as_deref(), Some("v1.0"));
        for path in ["model", "./a/b", "/abs/path", "a/b/c", "../x", "a/", "/b", "org/name@", "~/m"] {
            assert_eq!(HubName::parse(path), None, "{path}");
        }
    }

    /// The cache layout `huggingface_hub` writes: refs name a commit, the snapshot holds the
    /// files; a commit can be named directly; a missing model or revision is one line naming
    /// the place looked at.
    #[test]
    fn names_resolve_to_their_snapshot_in_the_cache_layout() {
        let cache = std::env::temp_dir().join(format!("ferry-hub-{}", std::process::id()));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = cache.join("models--org--tiny").join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(cache.join("models--org--tiny/refs")).unwrap();
        std::fs::write(cache.join("models--org--tiny/refs/main"), format!("{commit}\n")).unwrap();
        let name = |s: &str| HubName::parse(s).unwrap();
        assert_eq!(snapshot_in(&cache, &name("org/tiny")).unwrap(), snapshot);
        assert_eq!(snapshot_in(&cache, &name(&format!("org/tiny@{commit}"))).unwrap(), snapshot);
        let err = snapshot_in(&cache, &name("org/tiny@dev")).unwrap_err().to_string();
        assert!(err.contains("revision \"dev\"") && !err.contains('\n'), "{err}");
        let err = snapshot_in(&cache, &name("org/absent")).unwrap_err().to_string();
        assert!(err.contains("org/absent") && err.contains("not in the HuggingFace cache"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
