//! GPT-OSS (`GptOssForCausalLM`): attention sinks, sliding-window layers alternating with full
//! ones (`layer_types`), q/k/v/o biases, YaRN RoPE (with `truncate`), a router with a bias whose
//! top-k logits are softmaxed, and fused experts (`gate_up_proj` with gate and up interleaved,
//! biases, GPT-OSS's clamped SwiGLU), stored in MXFP4 in released checkpoints.
//!
//! The clamp limit is `swiglu_limit` (7.0 in released configs). transformers 4.57 hard-codes 7.0
//! and ignores the key; a config with another value runs with the config's.

use std::path::Path;

use ferry_runtime::error::{FerryError, Result};
use ferry_runtime::spec::{ExpertActivation, ExpertLayout, ModelSpec, MoeSpec, RouterKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use serde_json::Value;

use crate::common::{self, cfg_error};
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "GptOssForCausalLM";

/// GPT-OSS's gate scale inside the sigmoid.
const ALPHA: f32 = 1.702;

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "gpt_oss", 150000.0)?;
    let layers = spec.layers.len();
    let a = &mut spec.attention;
    a.head_dim = cfg.usize_or("head_dim", a.head_dim)?;
    // GptOssConfig always sets attention_bias; older dumps may lack the key.
    a.qkv_bias = true;
    a.o_bias = true;
    a.sinks = true;
    a.sliding_window = cfg.opt_usize("sliding_window")?;
    let types = match cfg.get("layer_types") {
        None => (0..layers).map(|l| l % 2 == 0).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(cfg_error(
                    cfg,
                    format!("layer_types: unknown entry {t}; use sliding_attention or full_attention"),
                )),
            })
            .collect::<Result<Vec<bool>>>()?,
        Some(other) => return Err(cfg_error(cfg, format!("layer_types must be a list, found {other}"))),
    };
    if types.len() != layers {
        return Err(cfg_error(cfg, format!("layer_types has {} entries for num_hidden_layers {layers}", types.len())));
    }
    if types.contains(&true) && a.sliding_window.is_none_or(|w| w == 0) {
        return Err(cfg_error(cfg, "sliding_attention layers need a positive sliding_window".into()));
    }
    a.sliding_layers = Some(types);

    let limit = cfg.f32_or("swiglu_limit", 7.0)?;
    if limit <= 0.0 {
        return Err(cfg_error(cfg, format!("swiglu_limit must be positive, found {limit}")));
    }
    let quant = cfg.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(Value::as_str);
    let layout = match quant {
        None => ExpertLayout::Fused,
        Some("mxfp4") => ExpertLayout::Mxfp4,
        Some(other) => {
            return Err(cfg_error(cfg, format!("quantization_config.quant_method {other:?} is not supported (mxfp4)")));
        }
    };
    let intermediate = cfg.usize("intermediate_size")?;
    // Checked here, so the error names the config rather than `--expert-dtype`, a flag the
    // user may not have given (auto keeps MXFP4).
    if layout == ExpertLayout::Mxfp4 && !(spec.hidden_size.is_multiple_of(32) && intermediate.is_multiple_of(32)) {
        return Err(cfg_error(
            cfg,
            format!(
                "quantization_config.quant_method \"mxfp4\" stores blocks of 32 weights: hidden_size ({}) and \
                 intermediate_size ({intermediate}) must be multiples of 32",
                spec.hidden_size
            ),
        ));
    }
    spec.moe = MoeSpec {
        num_experts: cfg.usize("num_local_experts")?,
        top_k: cfg.usize_or("num_experts_per_tok", 4)?,
        expert_intermediate_size: intermediate,
        router: RouterKind::TopKSoftmax,
        shared_expert: None,
        router_bias: true,
        activation: ExpertActivation::ClampedSwiglu { limit, alpha: ALPHA },
        expert_bias: true,
        layout,
    };
    spec.names.router = "mlp.router.weight".into();
    Ok(spec)
}

/// Writes a GPT-OSS-20B-shaped model with random weights (`ferry random-model --preset
/// gpt-oss-20b --layers N`): the released config with `layers` layers, BF16 dense tensors and
/// MXFP4 experts as the hub ships them, and the built-in tokenizer (whose ids cover only the
/// first part of the 201088-entry vocabulary). For exercising real tensor sizes without a
/// download: the LM head alone is 2.2 GiB in f32.
pub fn write_random(dir: &Path, layers: usize, seed: u64) -> Result<()> {
    const HIDDEN: usize = 2880;
    const INTER: usize = 2880;
    const VOCAB: usize = 201088;
    const EXPERTS: usize = 32;
    const HEADS: usize = 64;
    const KV_HEADS: usize = 8;
    const HEAD_DIM: usize = 64;
    let layers = layers.max(1);
    let (_, eos) = crate::random_model::vocab_and_eos()?;
    let layer_types: Vec<&str> = ["sliding_attention", "full_attention"].iter().copied().cycle().take(layers).collect();
    let config = serde_json::json!({
        "architectures": [ARCHITECTURE], "model_type": "gpt_oss", "attention_bias": true,
        "eos_token_id": eos, "experts_per_token": 4, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initial_context_length": 4096, "intermediate_size": INTER,
        "layer_types": layer_types, "max_position_embeddings": 131072, "num_attention_heads": HEADS,
        "num_experts_per_tok": 4, "num_hidden_layers": layers, "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
            "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
        "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": VOCAB
    });
    crate::random_model::write_folder_files(dir, &config, eos)?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
    // Norm gains near 1; biases and sinks small; weights uniform with standard deviation
    // 1/sqrt(fan-in).
    let bf16_tensor = |name: &str, shape: &[usize], rng: &mut StdRng| -> Vec<u8> {
        let n: usize = shape.iter().product();
        let small = name.ends_with(".bias") || name.ends_with("sinks") || name.ends_with("_bias");
        let scale = (3.0 / *shape.last().unwrap_or(&1) as f32).sqrt();
        (0..n)
            .flat_map(|_| {
                let r = rng.random::<f32>() * 2.0 - 1.0;
                let v = if small {
                    r * 0.1
                } else if shape.len() == 1 {
                    1.0 + 0.1 * r
                } else {
                    r * scale
                };
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect()
    };
    let ffn = |p: &str| {
        vec![
            (format!("{p}.self_attn.sinks"), vec![HEADS]),
            (format!("{p}.self_attn.q_proj.bias"), vec![HEADS * HEAD_DIM]),
            (format!("{p}.self_attn.k_proj.bias"), vec![KV_HEADS * HEAD_DIM]),
            (format!("{p}.self_attn.v_proj.bias"), vec![KV_HEADS * HEAD_DIM]),
            (format!("{p}.self_attn.o_proj.bias"), vec![HIDDEN]),
            (format!("{p}.mlp.router.weight"), vec![EXPERTS, HIDDEN]),
            (format!("{p}.mlp.router.bias"), vec![EXPERTS]),
            (format!("{p}.mlp.experts.gate_up_proj_bias"), vec![EXPERTS, 2 * INTER]),
            (format!("{p}.mlp.experts.down_proj_bias"), vec![EXPERTS, HIDDEN]),
        ]
    };
    // GPT-OSS's attention is 64 heads of 64 over a 2880 hidden size: q/o are not hidden x hidden.
    for (name, shape) in crate::common::decoder_tensors(VOCAB, HIDDEN, layers, [HEADS, KV_HEADS, HEAD_DIM], ffn) {
        let bytes = bf16_tensor(&name, &shape, &mut rng);
        tensors.push((name, shape, bytes, safetensors::Dtype::BF16));
    }
    for l in 0..layers {
        let p = format!("model.layers.{l}.mlp.experts");
        for (name, rows, k) in [("gate_up_proj", 2 * INTER, HIDDEN), ("down_proj", HIDDEN, INTER)] {
            let blocks: Vec<u8> = (0..EXPERTS * rows * k / 2).map(|_| rng.random::<u8>()).collect();
            // Block scales near 2^-7, so weights stay about 1/sqrt(2880) in size.
            let scales: Vec<u8> = (0..EXPERTS * rows * k / 32).map(|_| 119 + rng.random_range(0..3u8)).collect();
            tensors.push((
                format!("{p}.{name}_blocks"),
                vec![EXPERTS, rows, k / 32, 16],
                blocks,
                safetensors::Dtype::U8,
            ));
            tensors.push((format!("{p}.{name}_scales"), vec![EXPERTS, rows, k / 32], scales, safetensors::Dtype::U8));
        }
    }
    let path = dir.join("model.safetensors");
    let views = tensors
        .iter()
        .map(|(name, shape, bytes, dtype)| TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(&path, e))?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| FerryError::io(&path, e))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ferry_runtime::spec::{ExpertLayout, RopeScaling};

    use crate::config::HfConfig;

    /// GPT-OSS-20B's config.json as released (values from the hub's file): the spec has the
    /// alternating windows, MXFP4 experts and YaRN without truncation, and its sliding layers'
    /// KV cache stays at 128 positions however long the context.
    #[test]
    fn gpt_oss_20b_config_reads_as_released() {
        let layer_types: Vec<&str> = ["sliding_attention", "full_attention"].repeat(12);
        let cfg = HfConfig::from_value(
            PathBuf::from("gpt-oss-20b/config.json"),
            serde_json::json!({
                "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
                "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
                "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
                "layer_types": layer_types,
                "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
                "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
                "num_local_experts": 32, "output_router_logits": false, "pad_token_id": 199999,
                "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                    "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
                "rms_norm_eps": 1e-05,
                "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
                "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
                "swiglu_limit": 7.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
                "use_cache": true, "vocab_size": 201088
            }),
        );
        let spec = super::spec(&cfg).unwrap();
        assert_eq!(spec.moe.layout, ExpertLayout::Mxfp4);
        assert_eq!((spec.moe.num_experts, spec.moe.top_k, spec.attention.head_dim), (32, 4, 64));
        let RopeScaling::Yarn(yarn) = &spec.rope.scaling else { panic!("YaRN") };
        assert!(!yarn.truncate);
        assert!((yarn.attention_factor - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12);
        let a = &spec.attention;
        assert_eq!((0..24).filter(|&l| a.window(l) == Some(128)).count(), 12);
        // 12 full layers hold the context, 12 sliding ones 128 positions: f32 K and V, 8 heads x 64.
        assert_eq!(a.kv_elements(24, 100_000), (12 * 100_000 + 12 * 128) * 2 * 8 * 64);
    }
}
