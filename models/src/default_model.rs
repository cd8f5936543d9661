//! The built-in default model: a small Mixtral-shaped MoE with deterministic random weights,
//! written on first use into Ferry's cache folder so that `ferry generate` works out of the box.
//! It produces gibberish; it exists to exercise the whole path without a download.

use std::path::{Path, PathBuf};

use ferry_runtime::error::{FerryError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;

/// Bumped whenever the generated model changes, so stale caches are not reused.
const NAME: &str = "default-moe-v1";
const TOKENIZER: &str = include_str!("../default/tokenizer.json");
const TOKENIZER_CONFIG: &str = include_str!("../default/tokenizer_config.json");

const HIDDEN: usize = 128;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const INTERMEDIATE: usize = 256;
const CONTEXT: usize = 2048;

/// Ferry's cache folder: `$FERRY_CACHE`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FERRY_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("ferry"));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache").join("ferry"))
        .ok_or_else(|| FerryError::flag("--model", "no cache folder for the default model: set FERRY_CACHE or HOME"))
}

/// The default model's folder, generated first if it is not there yet.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?.join(NAME);
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    write(&tmp)?;
    // Renaming a complete folder into place keeps a concurrent or interrupted run from seeing
    // half a model.
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(FerryError::io(&dir, e)),
    }
}

/// Vocabulary size and the id of `<|im_end|>` (the end of an assistant turn) in the embedded
/// tokenizer.
fn vocab_and_eos() -> Result<(usize, u32)> {
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

/// Writes the whole folder: config, generation config, tokenizer files and weights.
pub fn write(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| FerryError::io(dir, e))?;
    let (vocab, eos) = vocab_and_eos()?;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "eos_token_id": eos,
        "torch_dtype": "float32"
    });
    let files = [
        ("config.json", serde_json::to_string_pretty(&config).unwrap_or_default()),
        ("generation_config.json", serde_json::json!({ "eos_token_id": eos }).to_string()),
        ("tokenizer.json", TOKENIZER.to_string()),
        ("tokenizer_config.json", TOKENIZER_CONFIG.to_string()),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| FerryError::io(&path, e))?;
    }
    write_weights(&dir.join("model.safetensors"), vocab)
}

fn write_weights(path: &Path, vocab: usize) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0x_f311);
    let head_dim = HIDDEN / HEADS;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    // Norm gains are 1; every other weight is uniform with a standard deviation of `STD`.
    const STD: f32 = 0.08;
    let mut add = |name: String, shape: Vec<usize>, random: bool| {
        let n: usize = shape.iter().product();
        let scale = STD * 3f32.sqrt();
        let bytes = (0..n)
            .flat_map(|_| if random { (rng.random::<f32>() * 2.0 - 1.0) * scale } else { 1.0 }.to_le_bytes())
            .collect();
        tensors.push((name, shape, bytes));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, HIDDEN], true);
    add("lm_head.weight".into(), vec![vocab, HIDDEN], true);
    add("model.norm.weight".into(), vec![HIDDEN], false);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN], false);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], false);
        for (name, rows) in
            [("q_proj", HEADS * head_dim), ("k_proj", KV_HEADS * head_dim), ("v_proj", KV_HEADS * head_dim)]
        {
            add(format!("{p}.self_attn.{name}.weight"), vec![rows, HIDDEN], true);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * head_dim], true);
        add(format!("{p}.block_sparse_moe.gate.weight"), vec![EXPERTS, HIDDEN], true);
        for e in 0..EXPERTS {
            let q = format!("{p}.block_sparse_moe.experts.{e}");
            add(format!("{q}.w1.weight"), vec![INTERMEDIATE, HIDDEN], true);
            add(format!("{q}.w3.weight"), vec![INTERMEDIATE, HIDDEN], true);
            add(format!("{q}.w2.weight"), vec![HIDDEN, INTERMEDIATE], true);
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(path, e))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| FerryError::io(path, e))
}
