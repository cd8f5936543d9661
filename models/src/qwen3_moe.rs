//! Qwen3-MoE (`Qwen3MoeForCausalLM`): RMSNorm on q and k per head (over `head_dim`, which comes
//! from the config and need not be hidden/heads), top-k renormalised when `norm_topk_prob`.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{ModelSpec, MoeSpec, QkNorm, RouterKind};

use crate::common;
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "Qwen3MoeForCausalLM";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "qwen3_moe", 10000.0)?;
    if cfg.bool_or("use_sliding_window", false)? {
        return Err(common::cfg_error(cfg, "use_sliding_window is not supported yet for Qwen3-MoE".into()));
    }
    spec.attention.head_dim = cfg.usize_or("head_dim", spec.attention.head_dim)?;
    spec.attention.qk_norm = QkNorm::PerHead;
    let num_experts = cfg.usize("num_experts")?;
    spec.moe = MoeSpec {
        num_experts,
        top_k: cfg.usize("num_experts_per_tok")?,
        expert_intermediate_size: cfg.usize("moe_intermediate_size")?,
        router: RouterKind::SoftmaxTopK { renormalize: cfg.bool_or("norm_topk_prob", false)? },
        shared_expert: None,
        ..spec.moe
    };
    spec.layers = common::qwen_layer_kinds(cfg, spec.layers.len(), num_experts)?;
    Ok(spec)
}
