//! GPT-OSS (`GptOssForCausalLM`): attention sinks, sliding-window layers alternating with full
//! ones (`layer_types`), q/k/v/o biases, YaRN RoPE (with `truncate`), a router with a bias whose
//! top-k logits are softmaxed, and fused experts (`gate_up_proj` with gate and up interleaved,
//! biases, GPT-OSS's clamped SwiGLU), stored in MXFP4 in released checkpoints.
//!
//! The clamp limit is `swiglu_limit` (7.0 in released configs). transformers 4.57 hard-codes 7.0
//! and ignores the key; a config with another value runs with the config's.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{ExpertActivation, ExpertLayout, ModelSpec, MoeSpec, RouterKind};
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
    spec.moe = MoeSpec {
        num_experts: cfg.usize("num_local_experts")?,
        top_k: cfg.usize_or("num_experts_per_tok", 4)?,
        expert_intermediate_size: cfg.usize("intermediate_size")?,
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
