//! Ferry's Mixture of Lookup Experts (`FerryMoleForCausalLM`; Jie et al., ICML 2025,
//! arXiv 2503.15798). A Llama-style decoder whose feed-forward in every layer is
//!
//! ```text
//! out = h + FFN_shared(n) + sum_j g_j * FFN_j(e)
//! n = RMSNorm_post_attention(h)        g = softmax(router(n)) over ALL experts (no top-k)
//! e = RMSNorm_expert,l(embed(token id))
//! ```
//!
//! All FFNs are SwiGLU (Ferry's block; the paper's released code uses GELU MLPs — a deliberate
//! difference, since the re-parameterisation does not depend on the activation).
//!
//! config.json keys: the usual `vocab_size`, `hidden_size`, `num_hidden_layers`,
//! `num_attention_heads`, `num_key_value_heads`, `max_position_embeddings`, `rms_norm_eps`,
//! `rope_theta`, `tie_word_embeddings`, `hidden_act` ("silu"); `intermediate_size` (the shared
//! FFN), `num_lookup_experts` and `lookup_expert_intermediate_size`.
//!
//! Tensors (HF names; `{l}` layer, `{j}` expert): `model.embed_tokens.weight` `[vocab, hidden]`,
//! `model.norm.weight`, `lm_head.weight` (unless tied), and per layer under `model.layers.{l}.`:
//! `input_layernorm.weight`, `self_attn.{q,k,v,o}_proj.weight`, `post_attention_layernorm.weight`,
//! `mlp.router.weight` `[experts, hidden]`, `mlp.shared_mlp.{gate,up,down}_proj.weight`,
//! `mlp.expert_norm.weight` `[hidden]` and `mlp.experts.{j}.{gate,up,down}_proj.weight`
//! (`[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`).
//!
//! A converted folder (`ferry convert mole-to-lut`) has no `mlp.experts.*` nor
//! `mlp.expert_norm.weight`; it has `mole_lut.bin` instead (format: `ferry_runtime::lut`), and
//! the runtime reads one row of it per token.

use std::path::Path;

use ferry_runtime::Gpu;
use ferry_runtime::error::{FerryError, Result};
use ferry_runtime::graph::write_lookup_table;
use ferry_runtime::lut::{LUT_FILE, LutDtype, LutHeader};
use ferry_runtime::spec::{FfnKind, ModelSpec, MoleNames, MoleSpec};
use ferry_runtime::weights::WeightStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;

use crate::common;
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "FerryMoleForCausalLM";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "mole", 10000.0)?;
    spec.attention.head_dim = cfg.usize_or("head_dim", spec.attention.head_dim)?;
    let mole = MoleSpec {
        num_experts: cfg.usize("num_lookup_experts")?,
        expert_intermediate_size: cfg.usize("lookup_expert_intermediate_size")?,
        shared_intermediate_size: cfg.usize("intermediate_size")?,
        names: MoleNames {
            router: "mlp.router".into(),
            shared: "mlp.shared_mlp".into(),
            expert: "mlp.experts.{e}".into(),
            expert_norm: "mlp.expert_norm.weight".into(),
        },
    };
    if mole.num_experts == 0 || mole.expert_intermediate_size == 0 || mole.shared_intermediate_size == 0 {
        return Err(common::cfg_error(
            cfg,
            "num_lookup_experts, lookup_expert_intermediate_size and intermediate_size must be positive".into(),
        ));
    }
    spec.layers = vec![FfnKind::Mole; spec.layers.len()];
    spec.mole = Some(mole);
    Ok(spec)
}

/// Shapes of a random MoLE checkpoint (tests, benchmarks). Vocabulary: the embedded
/// 384-token tokenizer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoleShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub expert_intermediate: usize,
    pub shared_intermediate: usize,
    pub context: usize,
}

/// A small MoLE: 4 layers of 4 lookup experts, hidden 128.
pub const SMALL: MoleShape = MoleShape {
    hidden: 128,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    experts: 4,
    expert_intermediate: 256,
    shared_intermediate: 256,
    context: 2048,
};

/// The config.json of a MoLE model with these shapes.
pub fn config_json(shape: MoleShape, vocab: usize, eos: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": [ARCHITECTURE],
        "model_type": "ferry_mole",
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.shared_intermediate,
        "num_lookup_experts": shape.experts,
        "lookup_expert_intermediate_size": shape.expert_intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "eos_token_id": eos,
        "torch_dtype": "float32"
    })
}

/// Writes a MoLE model folder with deterministic random f32 weights and the embedded tokenizer.
pub fn write_random(dir: &Path, shape: MoleShape, seed: u64) -> Result<()> {
    let (vocab, eos) = crate::random_model::vocab_and_eos()?;
    crate::random_model::write_folder_files(dir, &config_json(shape, vocab, eos), eos)?;
    let path = dir.join("model.safetensors");
    let MoleShape { hidden: h, heads, kv_heads, experts, expert_intermediate: ie, shared_intermediate: is, .. } = shape;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    // Norm gains near 1, other weights uniform with standard deviation min(0.08, 1/sqrt(h)), as
    // the random MoE default does, so activations stay in range.
    let scale = (1.0 / (h as f32).sqrt()).min(0.08) * 3f32.sqrt();
    let mut add = |name: String, dims: Vec<usize>, norm: bool| {
        let n: usize = dims.iter().product();
        let bytes = (0..n)
            .flat_map(|_| {
                let r = rng.random::<f32>() * 2.0 - 1.0;
                let v = if norm { 1.0 + 0.1 * r } else { r * scale };
                v.to_le_bytes()
            })
            .collect();
        tensors.push((name, dims, bytes));
    };
    let ffn = |p: &str| {
        let mut out = vec![(format!("{p}.mlp.router.weight"), vec![experts, h])];
        for (q, inter) in [(format!("{p}.mlp.shared_mlp"), is)]
            .into_iter()
            .chain((0..experts).map(|j| (format!("{p}.mlp.experts.{j}"), ie)))
        {
            out.push((format!("{q}.gate_proj.weight"), vec![inter, h]));
            out.push((format!("{q}.up_proj.weight"), vec![inter, h]));
            out.push((format!("{q}.down_proj.weight"), vec![h, inter]));
        }
        out.push((format!("{p}.mlp.expert_norm.weight"), vec![h]));
        out
    };
    for (name, dims) in crate::common::decoder_tensors(vocab, h, shape.layers, [heads, kv_heads, h / heads], ffn) {
        let norm = dims.len() == 1;
        add(name, dims, norm);
    }
    let views = tensors
        .iter()
        .map(|(name, dims, bytes)| {
            TensorView::new(safetensors::Dtype::F32, dims.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(&path, e))?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| FerryError::io(&path, e))
}

/// Whether a tensor of a MoLE checkpoint belongs to the lookup experts (and so is replaced by
/// the table when converting).
pub fn is_lookup_expert_tensor(name: &str) -> bool {
    name.contains(".mlp.experts.") || name.ends_with(".mlp.expert_norm.weight")
}

/// Writes every tensor of `store` except the lookup experts' to one safetensors file at `path`,
/// bytes and dtypes unchanged. Returns the bytes of tensor data written.
pub fn write_without_lookup_experts(store: &WeightStore, path: &Path) -> Result<usize> {
    let mut views = Vec::new();
    let mut total = 0;
    for name in store.names().into_iter().filter(|n| !is_lookup_expert_tensor(n)) {
        let Some(tensor) = store.tensor(name) else { continue };
        let dtype = tensor.dtype.to_safetensors();
        let bytes = store.bytes(tensor);
        total += bytes.len();
        let view = TensorView::new(dtype, tensor.shape.clone(), bytes).map_err(|e| FerryError::io(path, e))?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| FerryError::io(path, e))?;
    Ok(total)
}

/// Files copied unchanged from the source folder by `convert_to_lut`, when present.
const COPIED: &[&str] = &["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"];

/// What `convert_to_lut` wrote.
#[derive(Debug, Clone, Copy)]
pub struct Converted {
    pub table: LutHeader,
    /// Bytes of tensor data in the output's model.safetensors (everything but the experts).
    pub kept_weight_bytes: usize,
}

/// `ferry convert mole-to-lut`: evaluates every lookup expert of the MoLE model in `model` on
/// every vocabulary entry (on `gpu`) and writes a complete model folder into `out`: config,
/// tokenizer, the weights without the expert FFNs, and the table `mole_lut.bin`.
/// `on_progress(tokens_done, vocab)` is called after each batch.
pub fn convert_to_lut(
    model: &Path,
    out: &Path,
    gpu: &Gpu,
    dtype: LutDtype,
    on_progress: impl FnMut(usize, usize),
) -> Result<Converted> {
    let opened = crate::open(model)?;
    let mole = opened.spec.mole.as_ref().ok_or_else(|| {
        FerryError::flag("--model", format!("{}: {} is not a MoLE model", model.display(), opened.spec.architecture))
    })?;
    let first_expert = opened.spec.names.layer(0, &mole.names.expert_norm);
    if !opened.weights.contains(&first_expert) {
        return Err(FerryError::flag(
            "--model",
            format!("{}: no lookup expert FFNs ({first_expert}); already converted?", model.display()),
        ));
    }
    if out.join("config.json").exists() {
        return Err(FerryError::flag("--out", format!("{}: a model is already there", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| FerryError::io(out, e))?;
    let table =
        write_lookup_table(&opened.spec, &opened.weights, &gpu.device, &out.join(LUT_FILE), dtype, on_progress)?;
    for name in COPIED {
        let from = model.join(name);
        if from.exists() {
            std::fs::copy(&from, out.join(name)).map_err(|e| FerryError::io(&from, e))?;
        }
    }
    let kept_weight_bytes = write_without_lookup_experts(&opened.weights, &out.join("model.safetensors"))?;
    Ok(Converted { table, kept_weight_bytes })
}
