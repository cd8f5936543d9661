//! Qwen3-MoE (`Qwen3MoeForCausalLM`): RMSNorm on q and k per head (over `head_dim`, which comes
//! from the config and need not be hidden/heads), top-k renormalised when `norm_topk_prob`.

use std::path::Path;

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
/// `ferry random-model --preset qwen3-30b-a3b`: Qwen3-30B-A3B's released config (48 layers of 128
/// experts of 768, top-8, 32 query and 4 key/value heads of 128, q/k norms) with `layers` layers,
/// random BF16 weights and the embedded 384-token tokenizer's vocabulary.
pub fn write_random(dir: &Path, layers: usize, seed: u64) -> Result<()> {
    const HIDDEN: usize = 2048;
    const HEADS: usize = 32;
    const KV_HEADS: usize = 4;
    const HEAD_DIM: usize = 128;
    const EXPERTS: usize = 128;
    const INTER: usize = 768;
    let layers = layers.max(1);
    let (vocab, eos) = crate::random_model::vocab_and_eos()?;
    let config = serde_json::json!({
        "architectures": [ARCHITECTURE], "model_type": "qwen3_moe", "attention_bias": false,
        "decoder_sparse_step": 1, "eos_token_id": eos, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "mlp_only_layers": [], "moe_intermediate_size": INTER, "norm_topk_prob": true,
        "num_attention_heads": HEADS, "num_experts": EXPERTS, "num_experts_per_tok": 8,
        "num_hidden_layers": layers, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "use_sliding_window": false, "vocab_size": vocab
    });
    crate::random_model::write_folder_files(dir, &config, eos)?;
    let ffn = |p: &str| {
        let mut out = vec![
            (format!("{p}.self_attn.q_norm.weight"), vec![HEAD_DIM]),
            (format!("{p}.self_attn.k_norm.weight"), vec![HEAD_DIM]),
            (format!("{p}.mlp.gate.weight"), vec![EXPERTS, HIDDEN]),
        ];
        for e in 0..EXPERTS {
            let q = format!("{p}.mlp.experts.{e}");
            out.push((format!("{q}.gate_proj.weight"), vec![INTER, HIDDEN]));
            out.push((format!("{q}.up_proj.weight"), vec![INTER, HIDDEN]));
            out.push((format!("{q}.down_proj.weight"), vec![HIDDEN, INTER]));
        }
        out
    };
    // Qwen3's attention is 32 heads of 128 over a 2048 hidden size: q/o are not hidden x hidden.
    let shapes = crate::common::decoder_tensors(vocab, HIDDEN, layers, [HEADS, KV_HEADS, HEAD_DIM], ffn);
    crate::random_model::write_bf16_tensors(&dir.join("model.safetensors"), &shapes, seed)
}
