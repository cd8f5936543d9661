//! DeepSeek-V2 and V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`), as transformers 4.57
//! implements them: multi-head latent attention (q-LoRA in V3 and V2 checkpoints that set
//! `q_lora_rank`), interleaved RoPE on the shared rope key, the first `first_k_dense_replace`
//! layers dense, shared experts without a gate, and group-limited routing (V2: softmax, groups
//! scored by their best expert, raw probabilities; V3: sigmoid with `e_score_correction_bias`,
//! groups scored by their best two, unbiased weights renormalised when `norm_topk_prob`), with
//! weights times `routed_scaling_factor`.
//!
//! transformers 4.57 scales V3's attention scores by YaRN's mscale(factor, mscale_all_dim)^2 but
//! not V2's (DeepSeek's own V2 code does); Ferry follows transformers.

use std::path::Path;

use ferry_runtime::error::Result;
use ferry_runtime::spec::{
    FfnKind, GroupScoring, MlaSpec, ModelSpec, MoeSpec, RopeScaling, RouterKind, SharedExpertSpec, YarnSpec,
};

use crate::common::{self, cfg_error};
use crate::config::HfConfig;

pub const ARCHITECTURE_V2: &str = "DeepseekV2ForCausalLM";
pub const ARCHITECTURE_V3: &str = "DeepseekV3ForCausalLM";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    V2,
    V3,
}

pub fn spec_v2(cfg: &HfConfig) -> Result<ModelSpec> {
    spec(cfg, Version::V2)
}

pub fn spec_v3(cfg: &HfConfig) -> Result<ModelSpec> {
    spec(cfg, Version::V3)
}

fn spec(cfg: &HfConfig, version: Version) -> Result<ModelSpec> {
    let family = match version {
        Version::V2 => "deepseek_v2",
        Version::V3 => "deepseek_v3",
    };
    let mut spec = common::decoder(cfg, family, 10000.0)?;
    let heads = spec.attention.num_heads;
    if spec.attention.num_kv_heads != heads {
        return Err(cfg_error(
            cfg,
            format!(
                "num_key_value_heads ({}) must equal num_attention_heads ({heads}): MLA expands keys and values for \
                 every head",
                spec.attention.num_kv_heads
            ),
        ));
    }
    let mla = mla(cfg, version, &spec)?;
    let bias = cfg.bool_or("attention_bias", false)?;
    spec.attention.head_dim = mla.qk_head_dim();
    // Only the down projections (q_a, kv_a) and o_proj carry `attention_bias`; the MLA loader
    // reads these flags.
    spec.attention.qkv_bias = bias;
    spec.attention.o_bias = bias;
    spec.attention.mla = Some(mla);

    let num_experts = cfg.usize("n_routed_experts")?;
    let top_k = cfg.usize("num_experts_per_tok")?;
    let expert_size = cfg.usize_or("moe_intermediate_size", if version == Version::V2 { 1407 } else { 2048 })?;
    let shared = cfg.usize_or("n_shared_experts", if version == Version::V2 { 2 } else { 1 })?;
    let scaling = cfg.f32_or("routed_scaling_factor", if version == Version::V2 { 1.0 } else { 2.5 })?;
    let router = match version {
        Version::V2 => {
            let method = cfg.str_or("topk_method", "greedy")?;
            let (groups, topk_groups) = match method {
                "greedy" => (1, 1),
                "group_limited_greedy" => (cfg.usize("n_group")?, cfg.usize("topk_group")?),
                other => {
                    return Err(cfg_error(
                        cfg,
                        format!("topk_method {other:?} is not supported (DeepSeek-V2: greedy, group_limited_greedy)"),
                    ));
                }
            };
            RouterKind::Grouped { scoring: GroupScoring::SoftmaxMax, groups, topk_groups, renormalize: false, scaling }
        }
        Version::V3 => RouterKind::Grouped {
            scoring: GroupScoring::SigmoidSumTop2,
            groups: cfg.usize_or("n_group", 8)?,
            topk_groups: cfg.usize_or("topk_group", 4)?,
            renormalize: cfg.bool_or("norm_topk_prob", true)?,
            scaling,
        },
    };
    check_groups(cfg, router, num_experts, top_k)?;
    spec.moe = MoeSpec {
        num_experts,
        top_k,
        expert_intermediate_size: expert_size,
        router,
        shared_expert: (shared > 0)
            .then_some(SharedExpertSpec { intermediate_size: expert_size * shared, sigmoid_gate: false }),
        ..spec.moe
    };
    spec.names.shared_expert = "mlp.shared_experts".into();
    let dense_layers = cfg.usize_or("first_k_dense_replace", if version == Version::V2 { 0 } else { 3 })?;
    let dense = FfnKind::Dense { intermediate_size: cfg.usize("intermediate_size")? };
    spec.layers = (0..spec.layers.len())
        .map(|l| if l < dense_layers || num_experts == 0 { dense } else { FfnKind::Moe })
        .collect();
    Ok(spec)
}

/// The MLA shape, with the checks a hand-edited config can fail.
fn mla(cfg: &HfConfig, version: Version, spec: &ModelSpec) -> Result<MlaSpec> {
    // An explicit null means "no q-LoRA"; an absent key means transformers' default rank.
    let q_lora_rank = if cfg.has_key("q_lora_rank") { cfg.opt_usize("q_lora_rank")? } else { Some(1536) };
    let kv_lora_rank = cfg.usize_or("kv_lora_rank", 512)?;
    let qk_nope_head_dim = cfg.usize_or("qk_nope_head_dim", 128)?;
    let qk_rope_head_dim = cfg.usize_or("qk_rope_head_dim", 64)?;
    let v_head_dim = cfg.usize_or("v_head_dim", 128)?;
    let err = |message: String| Err(cfg_error(cfg, message));
    if kv_lora_rank == 0 || v_head_dim == 0 || q_lora_rank == Some(0) {
        return err(format!(
            "MLA ranks must be positive: kv_lora_rank {kv_lora_rank}, q_lora_rank {q_lora_rank:?}, v_head_dim \
             {v_head_dim}"
        ));
    }
    if qk_rope_head_dim == 0 || !qk_rope_head_dim.is_multiple_of(2) {
        return err(format!("qk_rope_head_dim ({qk_rope_head_dim}) must be positive and even for RoPE"));
    }
    // transformers sets `head_dim` to qk_rope_head_dim (and version 5 may save it); any other
    // value means the MLA keys were edited inconsistently.
    if let Some(head_dim) = cfg.opt_usize("head_dim")?
        && head_dim != qk_rope_head_dim
        && head_dim != qk_nope_head_dim + qk_rope_head_dim
    {
        return err(format!(
            "head_dim ({head_dim}) matches neither qk_rope_head_dim ({qk_rope_head_dim}) nor qk_nope_head_dim + \
             qk_rope_head_dim ({})",
            qk_nope_head_dim + qk_rope_head_dim
        ));
    }
    let mut softmax_scale = ((qk_nope_head_dim + qk_rope_head_dim) as f64).powf(-0.5);
    if let RopeScaling::Yarn(yarn) = &spec.rope.scaling {
        if yarn.original_max_position_embeddings > spec.max_position_embeddings {
            return err(format!(
                "rope scaling \"yarn\": original_max_position_embeddings ({}) exceeds max_position_embeddings ({}); \
                 YaRN extends a shorter original context",
                yarn.original_max_position_embeddings, spec.max_position_embeddings
            ));
        }
        if version == Version::V3
            && let Some(all) = yarn.mscale_all_dim.filter(|&m| m != 0.0)
        {
            let m = YarnSpec::mscale(yarn.factor, all);
            softmax_scale *= m * m;
        }
    }
    let rope_interleaved = version == Version::V2 || cfg.bool_or("rope_interleave", true)?;
    Ok(MlaSpec {
        q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim,
        rope_interleaved,
        softmax_scale: softmax_scale as f32,
    })
}

fn check_groups(cfg: &HfConfig, router: RouterKind, experts: usize, top_k: usize) -> Result<()> {
    let RouterKind::Grouped { scoring, groups, topk_groups, .. } = router else { return Ok(()) };
    let err = |message: String| Err(cfg_error(cfg, message));
    if groups == 0 || !experts.is_multiple_of(groups) {
        return err(format!("n_routed_experts ({experts}) must be a positive multiple of n_group ({groups})"));
    }
    if topk_groups == 0 || topk_groups > groups {
        return err(format!("topk_group ({topk_groups}) must be between 1 and n_group ({groups})"));
    }
    let per_group = experts / groups;
    if scoring == GroupScoring::SigmoidSumTop2 && per_group < 2 {
        return err(format!("n_group ({groups}) leaves {per_group} expert per group; V3 scores a group by its top 2"));
    }
    if top_k > topk_groups * per_group {
        return err(format!(
            "num_experts_per_tok ({top_k}) exceeds the {} experts of the topk_group ({topk_groups}) kept groups",
            topk_groups * per_group
        ));
    }
    Ok(())
}

/// `ferry random-model --preset deepseek-v2-lite`: DeepSeek-V2-Lite's released config (27 layers:
/// one dense FFN of 10944, then 64 routed experts of 1408, top-6, and two shared; MLA with a
/// 512-wide latent, 16 heads, no q-LoRA; YaRN) with `layers` layers, random BF16 weights and the
/// embedded 384-token tokenizer's vocabulary.
pub fn write_random(dir: &Path, layers: usize, seed: u64) -> Result<()> {
    const HIDDEN: usize = 2048;
    const HEADS: usize = 16;
    const NOPE: usize = 128;
    const ROPE: usize = 64;
    const V: usize = 128;
    const LATENT: usize = 512;
    const DENSE: usize = 10944;
    const EXPERTS: usize = 64;
    const INTER: usize = 1408;
    const SHARED: usize = 2;
    let layers = layers.max(1);
    let (vocab, eos) = crate::random_model::vocab_and_eos()?;
    let config = serde_json::json!({
        "architectures": [ARCHITECTURE_V2], "attention_bias": false, "aux_loss_alpha": 0.001,
        "bos_token_id": eos, "eos_token_id": eos, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": HIDDEN, "intermediate_size": DENSE,
        "kv_lora_rank": LATENT, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": INTER, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": EXPERTS,
        "n_shared_experts": SHARED, "norm_topk_prob": false, "num_attention_heads": HEADS,
        "num_experts_per_tok": 6, "num_hidden_layers": layers, "num_key_value_heads": HEADS,
        "q_lora_rank": null, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "seq_aux": true, "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy",
        "torch_dtype": "bfloat16", "v_head_dim": V, "vocab_size": vocab
    });
    crate::random_model::write_folder_files(dir, &config, eos)?;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, HIDDEN]),
        ("lm_head.weight".into(), vec![vocab, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    let swiglu = |shapes: &mut Vec<(String, Vec<usize>)>, p: &str, inter: usize| {
        shapes.push((format!("{p}.gate_proj.weight"), vec![inter, HIDDEN]));
        shapes.push((format!("{p}.up_proj.weight"), vec![inter, HIDDEN]));
        shapes.push((format!("{p}.down_proj.weight"), vec![HIDDEN, inter]));
    };
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![HEADS * (NOPE + ROPE), HIDDEN]));
        shapes.push((format!("{p}.self_attn.kv_a_proj_with_mqa.weight"), vec![LATENT + ROPE, HIDDEN]));
        shapes.push((format!("{p}.self_attn.kv_a_layernorm.weight"), vec![LATENT]));
        shapes.push((format!("{p}.self_attn.kv_b_proj.weight"), vec![HEADS * (NOPE + V), LATENT]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * V]));
        if l == 0 {
            swiglu(&mut shapes, &format!("{p}.mlp"), DENSE);
            continue;
        }
        shapes.push((format!("{p}.mlp.gate.weight"), vec![EXPERTS, HIDDEN]));
        for e in 0..EXPERTS {
            swiglu(&mut shapes, &format!("{p}.mlp.experts.{e}"), INTER);
        }
        swiglu(&mut shapes, &format!("{p}.mlp.shared_experts"), SHARED * INTER);
    }
    crate::random_model::write_bf16_tensors(&dir.join("model.safetensors"), &shapes, seed)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ferry_runtime::spec::{FfnKind, GroupScoring, RouterKind};

    use crate::config::HfConfig;

    /// DeepSeek-V2-Lite's config.json as released (values from the hub's file): greedy routing
    /// over 64 experts, no q-LoRA, one dense layer, YaRN with mscale = mscale_all_dim; MLA's cache
    /// holds 576 values per token and layer instead of 16 x (192 + 128) = 5120 (8.9x less).
    #[test]
    fn deepseek_v2_lite_config_reads_as_released() {
        let cfg = HfConfig::from_value(
            PathBuf::from("DeepSeek-V2-Lite/config.json"),
            serde_json::json!({
                "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "aux_loss_alpha": 0.001,
                "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
                "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
                "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
                "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
                "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
                "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
                "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "rms_norm_eps": 1e-06,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
                "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
                "seq_aux": true, "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy",
                "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400
            }),
        );
        let spec = super::spec_v2(&cfg).unwrap();
        let m = spec.attention.mla.as_ref().unwrap();
        assert_eq!(m.q_lora_rank, None);
        assert_eq!(spec.attention.kv_elements_per_token(), 512 + 64);
        assert_eq!(spec.attention.kv_elements_per_token_expanded(), 16 * (192 + 128));
        // transformers 4.57 gives V2 no mscale^2 in the softmax.
        assert!((m.softmax_scale - 192f32.powf(-0.5)).abs() < 1e-7);
        assert_eq!(spec.layers[0], FfnKind::Dense { intermediate_size: 10944 });
        assert!(spec.layers[1..].iter().all(|l| *l == FfnKind::Moe));
        let RouterKind::Grouped { scoring, groups, topk_groups, renormalize, scaling } = spec.moe.router else {
            panic!("grouped routing")
        };
        assert_eq!((scoring, groups, topk_groups, renormalize, scaling), (GroupScoring::SoftmaxMax, 1, 1, false, 1.0));
        assert_eq!(spec.moe.shared_expert.as_ref().unwrap().intermediate_size, 2 * 1408);
    }
}
