//! Mixtral (`MixtralForCausalLM`): softmax router with top-k renormalisation, experts named
//! w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`, optional sliding window.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{ModelSpec, MoeSpec, RouterKind};

use crate::common;
use crate::config::HfConfig;

pub const ARCHITECTURE: &str = "MixtralForCausalLM";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = common::decoder(cfg, "mixtral", 1e6)?;
    spec.attention.head_dim = cfg.usize_or("head_dim", spec.attention.head_dim)?;
    spec.attention.qkv_bias = false;
    spec.attention.o_bias = false;
    spec.attention.sliding_window = cfg.opt_usize("sliding_window")?;
    spec.moe = MoeSpec {
        num_experts: cfg.usize("num_local_experts")?,
        top_k: cfg.usize("num_experts_per_tok")?,
        expert_intermediate_size: cfg.usize("intermediate_size")?,
        router: RouterKind::SoftmaxTopK { renormalize: true },
        shared_expert: None,
        ..spec.moe
    };
    let names = &mut spec.names;
    names.router = "block_sparse_moe.gate.weight".into();
    names.expert = "block_sparse_moe.experts.{e}".into();
    names.expert_projections = ["w1".into(), "w3".into(), "w2".into()];
    Ok(spec)
}
