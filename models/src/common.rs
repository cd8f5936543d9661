//! What the supported families share: a Llama-style decoder with RMSNorm, RoPE and GQA.
//! Family files start from `decoder` and change only what differs.

use ferry_runtime::error::Result;
use ferry_runtime::spec::{
    AttentionSpec, ExpertActivation, ExpertLayout, FfnKind, ModelSpec, MoeSpec, QkNorm, RouterKind, TensorNames,
};

use crate::config::HfConfig;

/// The shared part of the spec. `moe` and `layers` are the family's to fill.
pub fn decoder(cfg: &HfConfig, family: &str, default_theta: f32) -> Result<ModelSpec> {
    let hidden = cfg.usize("hidden_size")?;
    let heads = cfg.usize("num_attention_heads")?;
    let kv_heads = cfg.usize_or("num_key_value_heads", heads)?;
    let act = cfg.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(cfg_error(cfg, format!("hidden_act {act:?} is not supported (Ferry's experts are SwiGLU: silu)")));
    }
    let layers = cfg.usize("num_hidden_layers")?;
    // Checked here, before the per-layer list is allocated.
    if !(1..=MAX_LAYERS).contains(&layers) {
        return Err(cfg_error(cfg, format!("num_hidden_layers must be in 1..={MAX_LAYERS}, found {layers}")));
    }
    Ok(ModelSpec {
        family: family.into(),
        architecture: cfg.architecture()?,
        vocab_size: cfg.usize("vocab_size")?,
        hidden_size: hidden,
        rms_norm_eps: cfg.f32_in("rms_norm_eps", 1e-6, [0.0, 0.1], true)?,
        max_position_embeddings: cfg.usize_or("max_position_embeddings", 4096)?,
        rope: cfg.rope(default_theta)?,
        attention: AttentionSpec {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            qkv_bias: cfg.bool_or("attention_bias", false)?,
            o_bias: cfg.bool_or("attention_bias", false)?,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            mla: None,
            sinks: false,
            sliding_layers: None,
        },
        moe: MoeSpec {
            num_experts: 0,
            top_k: 0,
            expert_intermediate_size: 0,
            router: RouterKind::SoftmaxTopK { renormalize: false },
            shared_expert: None,
            router_bias: false,
            activation: ExpertActivation::Silu,
            expert_bias: false,
            layout: ExpertLayout::PerExpert,
        },
        mole: None,
        layers: vec![FfnKind::Moe; layers],
        tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
        names: TensorNames::hf_default(),
        bos_token_id: cfg.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: cfg.token_ids("eos_token_id")?,
    })
}

/// Qwen's rule for which layers are sparse: not listed in `mlp_only_layers`, and every
/// `decoder_sparse_step`-th layer.
pub fn qwen_layer_kinds(cfg: &HfConfig, layers: usize, num_experts: usize) -> Result<Vec<FfnKind>> {
    let dense_only = cfg.usize_list("mlp_only_layers")?;
    let step = cfg.usize_or("decoder_sparse_step", 1)?.max(1);
    let dense = FfnKind::Dense { intermediate_size: cfg.usize("intermediate_size")? };
    Ok((0..layers)
        .map(|l| if !dense_only.contains(&l) && num_experts > 0 && (l + 1) % step == 0 { FfnKind::Moe } else { dense })
        .collect())
}

/// Most layers a config may declare (released models have under 200).
const MAX_LAYERS: usize = 4096;
/// Largest width (hidden, intermediate, head, rank sizes) and head or expert count; far beyond
/// released models, and small enough that the products below cannot overflow.
const MAX_WIDTH: usize = 1 << 20;
/// Largest vocabulary and context, in tokens.
const MAX_TOKENS: usize = 1 << 24;

/// Most parameters a config may describe (4.4 trillion; DeepSeek-V3 has 0.67): below this,
/// the spec's sizes in bytes are far from overflowing.
const MAX_PARAMETERS: u128 = 1 << 42;

/// Parameters the spec describes, in u128 so that no product of range-checked sizes overflows
/// (an upper estimate: biases and norms left out, MLA's projections counted in full).
fn parameters(spec: &ModelSpec) -> u128 {
    let u = |x: usize| x as u128;
    let (a, m, h) = (&spec.attention, &spec.moe, u(spec.hidden_size));
    let (q, kv) = (u(a.num_heads) * u(a.head_dim), u(a.num_kv_heads) * u(a.head_dim));
    let mut attention = h * (2 * q + 2 * kv);
    if let Some(mla) = &a.mla {
        let rank = u(mla.q_lora_rank.unwrap_or(0));
        attention += h * rank + rank * q + h * u(mla.kv_lora_rank + mla.qk_rope_head_dim);
        attention += u(mla.kv_lora_rank) * u(a.num_heads) * u(mla.qk_nope_head_dim + mla.v_head_dim);
        attention += u(a.num_heads) * u(mla.v_head_dim) * h;
    }
    let shared = m.shared_expert.as_ref().map_or(0, |s| u(s.intermediate_size));
    let ffn = |kind: &FfnKind| match kind {
        FfnKind::Dense { intermediate_size } => 3 * h * u(*intermediate_size),
        FfnKind::Moe => u(m.num_experts) * (3 * h * u(m.expert_intermediate_size) + h) + 3 * h * shared,
        FfnKind::Mole => {
            spec.mole.as_ref().map_or(0, |mole| h * u(mole.num_experts) + 3 * h * u(mole.shared_intermediate_size))
        }
    };
    2 * u(spec.vocab_size) * h + spec.layers.iter().map(|kind| attention + ffn(kind)).sum::<u128>()
}

/// Checks that hold for every family, once the spec is complete.
pub fn validate(cfg: &HfConfig, spec: &ModelSpec) -> Result<()> {
    let a = &spec.attention;
    let m = &spec.moe;
    let check = |ok: bool, message: String| if ok { Ok(()) } else { Err(cfg_error(cfg, message)) };
    let at_most = |what: &str, value: usize, max: usize| {
        check(value <= max, format!("{what} must be at most {max}, found {value}"))
    };
    at_most("vocab_size", spec.vocab_size, MAX_TOKENS)?;
    at_most("max_position_embeddings", spec.max_position_embeddings, MAX_TOKENS)?;
    at_most("hidden_size", spec.hidden_size, MAX_WIDTH)?;
    at_most("num_attention_heads", a.num_heads, MAX_WIDTH)?;
    at_most("num_key_value_heads", a.num_kv_heads, MAX_WIDTH)?;
    at_most("head_dim", a.head_dim, MAX_WIDTH)?;
    at_most("the number of experts", m.num_experts, MAX_WIDTH)?;
    at_most("the expert intermediate size", m.expert_intermediate_size, MAX_WIDTH)?;
    for kind in &spec.layers {
        if let FfnKind::Dense { intermediate_size } = kind {
            at_most("intermediate_size", *intermediate_size, MAX_WIDTH)?;
        }
    }
    if let Some(shared) = &m.shared_expert {
        at_most("the shared expert's intermediate size", shared.intermediate_size, MAX_WIDTH)?;
    }
    if let Some(mla) = &a.mla {
        for (key, value) in [
            ("q_lora_rank", mla.q_lora_rank.unwrap_or(0)),
            ("kv_lora_rank", mla.kv_lora_rank),
            ("qk_nope_head_dim", mla.qk_nope_head_dim),
            ("qk_rope_head_dim", mla.qk_rope_head_dim),
            ("v_head_dim", mla.v_head_dim),
        ] {
            at_most(key, value, MAX_WIDTH)?;
        }
    }
    at_most("num_attention_heads x head_dim", a.num_heads * a.head_dim, MAX_WIDTH)?;
    at_most("num_key_value_heads x head_dim", a.num_kv_heads * a.head_dim, MAX_WIDTH)?;
    let params = parameters(spec);
    check(
        params <= MAX_PARAMETERS,
        format!(
            "the sizes describe {params} parameters ({} GiB in f32), more than Ferry handles ({MAX_PARAMETERS}); check \
             hidden_size, intermediate sizes, vocab_size, num_hidden_layers and the expert count",
            (params * 4) >> 30
        ),
    )?;
    check(a.sliding_window != Some(0), "sliding_window must be positive (or null for none)".into())?;
    if let Some(clip) = a.clip_qkv {
        check(clip > 0.0 && clip.is_finite(), format!("clip_qkv must be a positive number (or null), found {clip}"))?;
    }
    check(spec.vocab_size > 0 && spec.hidden_size > 0, "vocab_size and hidden_size must be positive".into())?;
    check(
        a.num_heads > 0 && a.num_kv_heads > 0 && a.head_dim > 0,
        "attention heads and head_dim must be positive".into(),
    )?;
    check(
        a.num_heads.is_multiple_of(a.num_kv_heads),
        format!("num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", a.num_heads, a.num_kv_heads),
    )?;
    check(a.rope_dim().is_multiple_of(2), format!("the RoPE dimension ({}) must be even", a.rope_dim()))?;
    check(!spec.layers.is_empty(), "num_hidden_layers must be positive".into())?;
    if spec.layers.contains(&FfnKind::Moe) {
        check(m.num_experts > 0, "the model has MoE layers but no experts".into())?;
        check(
            m.top_k >= 1 && m.top_k <= m.num_experts,
            format!(
                "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                m.top_k, m.num_experts
            ),
        )?;
        check(m.expert_intermediate_size > 0, "the expert intermediate size must be positive".into())?;
    }
    check(spec.max_position_embeddings > 1, "max_position_embeddings must be at least 2".into())
}

pub fn cfg_error(cfg: &HfConfig, message: String) -> ferry_runtime::FerryError {
    ferry_runtime::FerryError::config(&cfg.path, message)
}

/// Names and shapes of a Llama-style decoder's tensors in checkpoint order (embedding, head,
/// final norm, then per layer its two norms, q/k/v/o, and whatever `ffn(layer_prefix)` adds), for
/// the random-checkpoint writers; `attention` is query heads, key/value heads and the head size
/// (which need not be hidden / heads). Vectors (norm gains) are the one-dimensional shapes.
pub fn decoder_tensors(
    vocab: usize,
    hidden: usize,
    layers: usize,
    [heads, kv_heads, head_dim]: [usize; 3],
    ffn: impl Fn(&str) -> Vec<(String, Vec<usize>)>,
) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, hidden]),
        ("lm_head.weight".to_string(), vec![vocab, hidden]),
        ("model.norm.weight".to_string(), vec![hidden]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        for (name, rows) in [("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)] {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![rows * head_dim, hidden]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, heads * head_dim]));
        out.extend(ffn(&p));
    }
    out
}
