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
