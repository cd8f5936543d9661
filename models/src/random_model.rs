//! The built-in default model, and Mixtral-layout MoE checkpoints with deterministic random
//! weights. The default is the small MoE trained on the King James Bible
//! (`models/trained/moe`, embedded in the binary and written on first use into Ferry's cache
//! folder so that `ferry generate` works out of the box). Random models have the expert shapes
//! of real MoEs for benchmarks; they produce gibberish but exercise the whole path, and its
//! bytes, without a download.

use std::path::{Path, PathBuf};

use ferry_runtime::error::{FerryError, Result};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;

/// Bumped whenever the default model changes, so stale caches are not reused.
const NAME: &str = "default-kjv-moe-v1";
/// The default model's files (`models/trained/moe`).
const DEFAULT_FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../trained/moe/config.json")),
    ("generation_config.json", include_bytes!("../trained/moe/generation_config.json")),
    ("tokenizer.json", include_bytes!("../trained/moe/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../trained/moe/tokenizer_config.json")),
    ("model.safetensors", include_bytes!("../trained/moe/model.safetensors")),
];
pub(crate) const TOKENIZER: &str = include_str!("../default/tokenizer.json");
pub(crate) const TOKENIZER_CONFIG: &str = include_str!("../default/tokenizer_config.json");

/// Shapes of a random model. The vocabulary is always the embedded 384-token tokenizer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Intermediate size of one expert.
    pub intermediate: usize,
    pub context: usize,
    /// Store weights as bf16 (as released checkpoints are) instead of f32.
    pub bf16: bool,
}

/// The random `default` preset: the shape of the former built-in random default model.
pub const DEFAULT: Shape = Shape {
    hidden: 128,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    experts: 8,
    top_k: 2,
    intermediate: 256,
    context: 2048,
    bf16: false,
};

/// Every `ferry random-model --preset`: the shapes below, Qwen3-30B-A3B's, DeepSeek-V2-Lite's,
/// the MoLE family's and GPT-OSS-20B's.
pub const PRESETS: [&str; 7] =
    ["default", "olmoe-1b-7b", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "mole", "gpt-oss-20b"];

/// Named shapes: `default`, and the attention and expert dimensions of real MoEs (vocabulary
/// reduced to the embedded tokenizer's, layers as given).
pub fn preset(name: &str, layers: Option<usize>) -> Result<Shape> {
    let mut shape = match name {
        "default" => DEFAULT,
        // allenai/OLMoE-1B-7B: 16 layers of 64 experts (1024 wide), top-8.
        "olmoe-1b-7b" => Shape {
            hidden: 2048,
            layers: 16,
            heads: 16,
            kv_heads: 16,
            experts: 64,
            top_k: 8,
            intermediate: 1024,
            context: 4096,
            bf16: true,
        },
        // mistralai/Mixtral-8x7B: 32 layers of 8 experts (14336 wide), top-2.
        "mixtral-8x7b" => Shape {
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            experts: 8,
            top_k: 2,
            intermediate: 14336,
            context: 32768,
            bf16: true,
        },
        other => {
            return Err(FerryError::flag("--preset", format!("unknown preset {other:?}; use {}", PRESETS.join(", "))));
        }
    };
    if let Some(layers) = layers {
        shape.layers = layers.max(1);
    }
    Ok(shape)
}

/// Ferry's cache folder: `$FERRY_CACHE`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

/// `cache_dir` with the environment given; an empty variable counts as unset (as XDG says), so
/// `FERRY_CACHE=''` does not mean the working folder.
pub fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("FERRY_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("ferry"));
    }
    var("HOME")
        .map(|home| PathBuf::from(home).join(".cache").join("ferry"))
        .ok_or_else(|| FerryError::flag("--model", "no cache folder for the default model: set FERRY_CACHE or HOME"))
}

/// The default model's folder, generated first if it is not there yet.
pub fn ensure() -> Result<PathBuf> {
    ensure_in(&cache_dir()?)
}

/// A temp folder of an interrupted write is removed once it is this old (a concurrent run
/// writes its 5 MB in far less).
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(60);

/// The default model's folder inside `cache`: reused when every file has the embedded size,
/// else (missing, interrupted, truncated) written again. Temp folders left by killed runs are
/// removed.
pub fn ensure_in(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(NAME);
    remove_stale_temps(cache);
    if intact(&dir) {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| FerryError::io(&tmp, e))?;
    for (name, bytes) in DEFAULT_FILES {
        let path = tmp.join(name);
        std::fs::write(&path, bytes).map_err(|e| FerryError::io(&path, e))?;
    }
    // A damaged copy moves aside first: a folder cannot be renamed onto a non-empty one.
    if dir.exists() {
        let old = dir.with_extension(format!("old{}", std::process::id()));
        if std::fs::rename(&dir, &old).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    // Renaming a complete folder into place keeps a concurrent or interrupted run from seeing
    // half a model.
    let renamed = std::fs::rename(&tmp, &dir);
    if renamed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    match renamed {
        Ok(()) => Ok(dir),
        Err(_) if intact(&dir) => Ok(dir),
        Err(e) => Err(FerryError::io(&dir, e)),
    }
}

/// Whether `dir` holds every default-model file at its embedded size.
fn intact(dir: &Path) -> bool {
    DEFAULT_FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
    })
}

/// Removes `NAME.tmpN` / `NAME.oldN` folders older than `STALE_TEMP` (a run killed while
/// writing); errors are ignored, the next run tries again.
fn remove_stale_temps(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(NAME)) else { continue };
        if !(rest.starts_with(".tmp") || rest.starts_with(".old")) {
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age >= STALE_TEMP) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Vocabulary size and the id of `<|im_end|>` (the end of an assistant turn) in the embedded
/// tokenizer.
pub(crate) fn vocab_and_eos() -> Result<(usize, u32)> {
    let bad =
        |message: &str| FerryError::Json { path: "models/default/tokenizer.json".into(), message: message.into() };
    let value: serde_json::Value = serde_json::from_str(TOKENIZER).map_err(|e| bad(&e.to_string()))?;
    let vocab = value["model"]["vocab"].as_object().map_or(0, |v| v.len());
    let added = value["added_tokens"].as_array().ok_or_else(|| bad("no added_tokens"))?;
    let eos = added
        .iter()
        .find(|t| t["content"] == "<|im_end|>")
        .and_then(|t| t["id"].as_u64())
        .ok_or_else(|| bad("no <|im_end|> token"))?;
    Ok((vocab + added.len(), eos as u32))
}

/// Writes a random model folder's text files: `config`, the generation config with `eos`, and
/// the embedded tokenizer.
pub(crate) fn write_folder_files(dir: &Path, config: &serde_json::Value, eos: u32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| FerryError::io(dir, e))?;
    let files = [
        ("config.json", serde_json::to_string_pretty(config).unwrap_or_default()),
        ("generation_config.json", serde_json::json!({ "eos_token_id": eos }).to_string()),
        ("tokenizer.json", TOKENIZER.to_string()),
        ("tokenizer_config.json", TOKENIZER_CONFIG.to_string()),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| FerryError::io(&path, e))?;
    }
    Ok(())
}

/// Writes `shapes` as random BF16 tensors into one safetensors file, in order: norm gains (1-D)
/// near 1, weights uniform with standard deviation 1/sqrt(fan-in).
pub(crate) fn write_bf16_tensors(path: &Path, shapes: &[(String, Vec<usize>)], seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bytes: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, shape)| {
            let scale = (3.0 / *shape.last().unwrap_or(&1) as f32).sqrt();
            let n: usize = shape.iter().product();
            (0..n)
                .flat_map(|_| {
                    let r = rng.random::<f32>() * 2.0 - 1.0;
                    let v = if shape.len() == 1 { 1.0 + 0.1 * r } else { r * scale };
                    bf16::from_f32(v).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views = shapes
        .iter()
        .zip(&bytes)
        .map(|((name, shape), bytes)| {
            TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(path, e))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| FerryError::io(path, e))
}

/// Writes a whole model folder: config, generation config, tokenizer files and weights.
pub fn write(dir: &Path, shape: Shape, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| FerryError::io(dir, e))?;
    let (vocab, eos) = vocab_and_eos()?;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_local_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "eos_token_id": eos,
        "torch_dtype": if shape.bf16 { "bfloat16" } else { "float32" }
    });
    write_folder_files(dir, &config, eos)?;
    write_weights(&dir.join("model.safetensors"), vocab, shape, seed)
}

fn write_weights(path: &Path, vocab: usize, shape: Shape, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let Shape { hidden, layers, heads, kv_heads, experts, intermediate, bf16: as_bf16, .. } = shape;
    let dtype = if as_bf16 { safetensors::Dtype::BF16 } else { safetensors::Dtype::F32 };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    // Norm gains are 1; every other weight is uniform with a standard deviation of 0.08 (the
    // default model) or 1/sqrt(fan-in) (large shapes), so activations stay in range.
    let std = (1.0 / (hidden as f32).sqrt()).min(0.08);
    let mut add = |name: String, shape: Vec<usize>, random: bool| {
        let n: usize = shape.iter().product();
        let scale = std * 3f32.sqrt();
        let mut bytes = Vec::with_capacity(n * if as_bf16 { 2 } else { 4 });
        for _ in 0..n {
            let v = if random { (rng.random::<f32>() * 2.0 - 1.0) * scale } else { 1.0 };
            if as_bf16 {
                bytes.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
            } else {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        tensors.push((name, shape, bytes));
    };
    let ffn = |p: &str| {
        let mut out = vec![(format!("{p}.block_sparse_moe.gate.weight"), vec![experts, hidden])];
        for e in 0..experts {
            let q = format!("{p}.block_sparse_moe.experts.{e}");
            out.push((format!("{q}.w1.weight"), vec![intermediate, hidden]));
            out.push((format!("{q}.w3.weight"), vec![intermediate, hidden]));
            out.push((format!("{q}.w2.weight"), vec![hidden, intermediate]));
        }
        out
    };
    for (name, dims) in crate::common::decoder_tensors(vocab, hidden, layers, [heads, kv_heads, hidden / heads], ffn) {
        let random = dims.len() > 1;
        add(name, dims, random);
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| TensorView::new(dtype, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(path, e))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| FerryError::io(path, e))
}
