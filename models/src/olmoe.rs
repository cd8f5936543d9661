//! OLMoE (`OlmoeForCausalLM`): RMSNorm over the whole q and k projections (before heads and
//! RoPE), optional `clip_qkv`, no top-k renormalisation by default.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{ModelSpec, MoeSpec, QkNorm, RouterKind};

use crate::common;
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "OlmoeForCausalLM";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "olmoe", 10000.0)?;
    spec.attention.qk_norm = QkNorm::WholeProjection;
    // null means no clipping; any other value must be a number (validated positive later).
    spec.attention.clip_qkv = cfg.get("clip_qkv").map(|_| cfg.f32_or("clip_qkv", 0.0)).transpose()?;
    spec.moe = MoeSpec {
        num_experts: cfg.usize("num_experts")?,
        top_k: cfg.usize("num_experts_per_tok")?,
        expert_intermediate_size: cfg.usize("intermediate_size")?,
        router: RouterKind::SoftmaxTopK { renormalize: cfg.bool_or("norm_topk_prob", false)? },
        shared_expert: None,
        ..spec.moe
    };
    Ok(spec)
}
