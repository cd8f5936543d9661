//! Qwen1.5 / Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases, a shared expert scaled by
//! `sigmoid(shared_expert_gate . x)`, no top-k renormalisation unless `norm_topk_prob`, and
//! dense layers by `mlp_only_layers` / `decoder_sparse_step`.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{ModelSpec, MoeSpec, RouterKind, SharedExpertSpec};

use crate::common;
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "Qwen2MoeForCausalLM";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "qwen2_moe", 10000.0)?;
    if cfg.bool_or("use_sliding_window", false)? {
        return Err(common::cfg_error(cfg, "use_sliding_window is not supported yet for Qwen2-MoE".into()));
    }
    // Qwen2-MoE always has q/k/v biases and no o_proj bias.
    spec.attention.qkv_bias = true;
    spec.attention.o_bias = false;
    let num_experts = cfg.usize("num_experts")?;
    let shared = cfg.usize_or("shared_expert_intermediate_size", 0)?;
    spec.moe = MoeSpec {
        num_experts,
        top_k: cfg.usize("num_experts_per_tok")?,
        expert_intermediate_size: cfg.usize("moe_intermediate_size")?,
        router: RouterKind::SoftmaxTopK { renormalize: cfg.bool_or("norm_topk_prob", false)? },
        shared_expert: (shared > 0).then_some(SharedExpertSpec { intermediate_size: shared, sigmoid_gate: true }),
        ..spec.moe
    };
    spec.layers = common::qwen_layer_kinds(cfg, spec.layers.len(), num_experts)?;
    Ok(spec)
}
