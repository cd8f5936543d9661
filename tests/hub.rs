//! Models by hub name downloaded from a server on 127.0.0.1 that answers the way the
//! HuggingFace hub does (`/api/models/ORG/NAME/revision/REV` lists the files; `/ORG/NAME/resolve/
//! REV/FILE` serves them with `etag`, `x-repo-commit` and byte ranges): only the files Ferry reads
//! are fetched, a dropped connection resumes where it stopped, `HF_TOKEN` is sent, the result runs
//! exactly as the folder itself, and a second run needs no server.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use crate::cli::{error_line, json_of};
use crate::support::fixture;

const COMMIT: &str = "4b1d5e0c0ffee0ddba11cafe0123456789abcdef";

/// One request the fake hub saw: path, `Range` header, `Authorization` header.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

struct FakeHub {
    address: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeHub {
    /// Serves the files of `folder` as `org/tiny` plus an extra file Ferry must not fetch; the
    /// first full read of the safetensors file is cut off halfway.
    fn start(folder: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut cut_once = true;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(request) = read_request(&stream) {
                    let cut = cut_once
                        && request.path.ends_with(".safetensors")
                        && request.range.as_deref().is_some_and(|r| r != "bytes=0-0");
                    if cut {
                        cut_once = false;
                    }
                    log.lock().unwrap().push(request.clone());
                    answer(stream, &folder, &request, cut);
                }
            }
        });
        Self { address, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "range" => range = Some(value.trim().to_string()),
            "authorization" => auth = Some(value.trim().to_string()),
            _ => {}
        }
    }
    Some(Seen { path, range, auth })
}

fn answer(mut stream: TcpStream, folder: &Path, request: &Seen, cut: bool) {
    let respond = |stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n", body.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    let mut files: Vec<String> =
        std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    if request.path == "/api/models/org/tiny/revision/main" {
        let mut siblings: Vec<serde_json::Value> = files.iter().map(|f| serde_json::json!({"rfilename": f})).collect();
        siblings.push(serde_json::json!({"rfilename": "pytorch_model.bin"}));
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        return respond(&mut stream, "200 OK", "content-type: application/json\r\n", body.as_bytes());
    }
    let Some(file) = request.path.strip_prefix("/org/tiny/resolve/main/") else {
        return respond(&mut stream, "404 Not Found", "", b"{\"error\":\"Repository not found\"}");
    };
    let Ok(bytes) = std::fs::read(folder.join(file)) else {
        return respond(&mut stream, "404 Not Found", "", b"{\"error\":\"Entry not found\"}");
    };
    let (start, end) = match request.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() { bytes.len() - 1 } else { b.parse().unwrap() };
            (a, b.min(bytes.len() - 1))
        }
        None => (0, bytes.len() - 1),
    };
    let etag = format!(
        "\"{:016x}{}\"",
        bytes.iter().fold(0u64, |h, &b| h.wrapping_mul(131).wrapping_add(b as u64)),
        file.len()
    );
    let headers =
        format!("etag: {etag}\r\nx-repo-commit: {COMMIT}\r\ncontent-range: bytes {start}-{end}/{}\r\n", bytes.len());
    let body = &bytes[start..=end];
    if cut {
        // Promise the whole range, send half, hang up.
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&body[..body.len() / 2]);
        return;
    }
    respond(&mut stream, "206 Partial Content", &headers, body);
}

fn ferry_with(envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.args(args);
    for var in ["HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        command.env_remove(var);
    }
    command.envs(envs.iter().copied()).output().expect("ferry runs")
}

fn generate(model: &str, envs: &[(&str, &str)]) -> Output {
    ferry_with(
        envs,
        &[
            "generate",
            "--model",
            model,
            "--ids",
            "1,2,3",
            "--greedy",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ],
    )
}

#[test]
fn hub_names_download_what_ferry_reads_resume_and_then_run_offline() {
    let folder = fixture("mixtral");
    let hub = FakeHub::start(folder.clone());
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_str().unwrap();
    let endpoint = format!("http://{}", hub.address);
    let env = [("HF_HUB_CACHE", cache_path), ("HF_ENDPOINT", endpoint.as_str()), ("HF_TOKEN", "hf_secret")];
    let downloaded = json_of(&generate("org/tiny", &env));
    let direct = json_of(&generate(folder.to_str().unwrap(), &[]));
    assert_eq!(downloaded["ids"], direct["ids"]);

    let seen = hub.seen();
    assert!(seen.iter().all(|s| s.auth.as_deref() == Some("Bearer hf_secret")), "{seen:?}");
    assert!(!seen.iter().any(|s| s.path.ends_with("pytorch_model.bin")), "fetched a file Ferry does not read");
    // The cut-off read was resumed from where it stopped, not started over.
    let weights: Vec<&Seen> =
        seen.iter().filter(|s| s.path.ends_with(".safetensors") && s.range.as_deref() != Some("bytes=0-0")).collect();
    assert!(weights.len() >= 2, "{weights:?}");
    let resumed = weights[1].range.as_deref().unwrap();
    assert_ne!(resumed, "bytes=0-", "{weights:?}");
    // The cache now has the layout huggingface_hub writes.
    let snapshot = cache.path().join("models--org--tiny").join("snapshots").join(COMMIT);
    assert!(snapshot.join("config.json").exists());
    assert_eq!(std::fs::read_to_string(cache.path().join("models--org--tiny/refs/main")).unwrap().trim(), COMMIT);

    // A second run finds it in the cache: no server needed.
    let offline = [("HF_HUB_CACHE", cache_path), ("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HUB_OFFLINE", "1")];
    assert_eq!(json_of(&generate("org/tiny", &offline))["ids"], direct["ids"]);
    // A name the hub does not have, and one that cannot be fetched offline: one line each.
    let line = error_line(&generate("org/absent", &env));
    assert!(line.contains("org/absent") && line.contains("404"), "{line}");
    let line = error_line(&generate("org/absent", &offline));
    assert!(line.contains("org/absent") && line.contains("HF_HUB_OFFLINE"), "{line}");
    let unreachable = [("HF_HUB_CACHE", cache_path), ("HF_ENDPOINT", "http://127.0.0.1:9")];
    let line = error_line(&generate("org/other", &unreachable));
    assert!(line.contains("org/other") && line.contains("127.0.0.1:9"), "{line}");
}
