//! `ModelSpec`: everything the graph needs to know about a model, independent of its family.
//! Family files in `ferry-models` fill it from a HuggingFace `config.json`.

/// How RoPE positions are scaled.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear {
        factor: f32,
    },
    /// YaRN (`rope_type: "yarn"`): low frequencies interpolated by `factor`, high ones kept, a
    /// linear ramp between the correction dimensions of `beta_fast` and `beta_slow` rotations
    /// over `original_max_position_embeddings`; cos and sin are multiplied by
    /// `attention_factor`.
    Yarn(YarnSpec),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct YarnSpec {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Resolved: the config's `attention_factor`, else from `mscale` / `mscale_all_dim`.
    pub attention_factor: f64,
    /// Round the correction range outward to whole dimensions (transformers' default).
    pub truncate: bool,
    /// `mscale_all_dim` as given (DeepSeek-V3 also scales its softmax by it).
    pub mscale_all_dim: Option<f64>,
}

impl YarnSpec {
    /// DeepSeek's and transformers' `yarn_get_mscale`.
    pub fn mscale(factor: f64, mscale: f64) -> f64 {
        if factor <= 1.0 { 1.0 } else { 0.1 * mscale * factor.ln() + 1.0 }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RopeSpec {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// Where RMSNorm is applied to queries and keys, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// Over the whole q (or k) projection, before splitting into heads (OLMoE).
    WholeProjection,
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded per head from a
/// shared latent of `kv_lora_rank` plus one RoPE key of `qk_rope_head_dim` shared by every head;
/// the KV cache holds only the latent and the rope key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MlaSpec {
    /// Queries through `q_a_proj` -> RMSNorm -> `q_b_proj` (V3) rather than one `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Rope lanes rotate as adjacent pairs (DeepSeek's layout); the loader permutes the rope
    /// rows of the projections so that the runtime's rotate-half RoPE gives the same scores.
    pub rope_interleaved: bool,
    /// Multiplies the attention scores (`(qk_nope + qk_rope)^-0.5`, times mscale^2 under V3's
    /// YaRN).
    pub softmax_scale: f32,
}

impl MlaSpec {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to [-c, c] after projection (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Keys older than this many positions are masked (Mixtral's `sliding_window`).
    pub sliding_window: Option<usize>,
    /// Multi-head latent attention; `head_dim` is then the q/k head size (nope + rope).
    pub mla: Option<MlaSpec>,
    /// One learned logit per head joins each softmax and is dropped afterwards (GPT-OSS's
    /// `self_attn.sinks`).
    pub sinks: bool,
    /// Which layers use `sliding_window` (GPT-OSS alternates); None: every layer.
    pub sliding_layers: Option<Vec<bool>>,
}

impl AttentionSpec {
    /// The sliding window of layer `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let sliding = self.sliding_layers.as_ref().is_none_or(|s| s.get(layer).copied().unwrap_or(false));
        self.sliding_window.filter(|_| sliding)
    }

    /// Lanes of each head that RoPE rotates.
    pub fn rope_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |m| m.qk_rope_head_dim)
    }

    /// Floats the KV cache keeps per token and layer: keys and values of every KV head, or
    /// MLA's latent and rope key.
    pub fn kv_elements_per_token(&self) -> usize {
        match &self.mla {
            None => 2 * self.num_kv_heads * self.head_dim,
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        }
    }

    /// Floats the KV cache holds for `tokens` positions over `layers` layers: windowed layers
    /// keep at most their window.
    pub fn kv_elements(&self, layers: usize, tokens: usize) -> usize {
        (0..layers).map(|l| self.window(l).map_or(tokens, |w| tokens.min(w))).sum::<usize>()
            * self.kv_elements_per_token()
    }

    /// What the cache would keep per token and layer with keys and values expanded per head
    /// (for MLA, what caching the latent saves).
    pub fn kv_elements_per_token_expanded(&self) -> usize {
        match &self.mla {
            None => self.kv_elements_per_token(),
            Some(m) => self.num_heads * (m.qk_head_dim() + m.v_head_dim),
        }
    }
}

/// How router logits become expert choices and weights.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum RouterKind {
    /// Softmax over all experts in f32, top-k; with `renormalize`, the k weights are divided by
    /// their sum (Mixtral always; Qwen/OLMoE when `norm_topk_prob`).
    SoftmaxTopK { renormalize: bool },
    /// DeepSeek's group-limited routing. Experts form `groups` equal groups; each group scores
    /// (V2: its best expert; V3: the sum of its best two), the best `topk_groups` groups are
    /// kept, and top-k is taken over their experts (the others count as score 0, as in
    /// transformers). V2 scores by softmax and weights by the raw probabilities; V3 scores by
    /// sigmoid, selects on score + `e_score_correction_bias`, and weights by the unbiased scores,
    /// renormalised when `renormalize`. Weights are then multiplied by `scaling`
    /// (`routed_scaling_factor`). V2's "greedy" method is one group.
    Grouped { scoring: GroupScoring, groups: usize, topk_groups: usize, renormalize: bool, scaling: f32 },
    /// GPT-OSS: top-k on the logits (the router has a bias), then softmax over those k.
    TopKSoftmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GroupScoring {
    /// DeepSeek-V2: softmax scores, a group scores its maximum.
    SoftmaxMax,
    /// DeepSeek-V3: sigmoid scores plus a per-expert correction bias, a group scores the sum of
    /// its top two.
    SigmoidSumTop2,
}

impl RouterKind {
    /// Whether the router has a per-expert selection bias (`e_score_correction_bias`).
    pub fn has_score_bias(&self) -> bool {
        matches!(self, Self::Grouped { scoring: GroupScoring::SigmoidSumTop2, .. })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SharedExpertSpec {
    pub intermediate_size: usize,
    /// Output multiplied by `sigmoid(shared_expert_gate . x)` (Qwen2-MoE).
    pub sigmoid_gate: bool,
}

/// The activation between a routed expert's gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ExpertActivation {
    /// `silu(gate) * up`.
    Silu,
    /// GPT-OSS: `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
    /// `(u + 1) * g * sigmoid(alpha * g)`.
    ClampedSwiglu { limit: f32, alpha: f32 },
}

/// How routed experts are laid out in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExpertLayout {
    /// One `[out, in]` matrix per expert and projection (`TensorNames::expert_weights`).
    PerExpert,
    /// GPT-OSS: per layer `gate_up_proj` `[experts, hidden, 2 * inter]` (used as `x @ W`, gate in
    /// the even columns, up in the odd) and `down_proj` `[experts, inter, hidden]`, with biases
    /// `gate_up_proj_bias` / `down_proj_bias`, under `TensorNames::fused_experts`.
    Fused,
    /// `Fused` stored in MXFP4: `{gate_up,down}_proj_blocks` `[experts, out, in / 32, 16]` (two
    /// e2m1 codes per byte, low nibble first) and `_scales` `[experts, out, in / 32]` (a power
    /// of two, exponent biased by 127); biases as in `Fused`.
    Mxfp4,
    /// Written by `ferry convert quantize`: per layer `ferry_experts.{gate,up,down}.codes` (U32,
    /// `[experts, code_rows(k, bits), n]`) and `.scales` (F32, `[experts, k / 32, n]`) in the slot layout
    /// of this format, so that loading copies them as they are. Other tensors (biases included)
    /// keep the source model's names.
    Prequantised(crate::options::ExpertDtype),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub expert_intermediate_size: usize,
    pub router: RouterKind,
    pub shared_expert: Option<SharedExpertSpec>,
    /// The router has a bias (GPT-OSS).
    pub router_bias: bool,
    pub activation: ExpertActivation,
    /// Routed experts have biases on gate/up and down (GPT-OSS).
    pub expert_bias: bool,
    pub layout: ExpertLayout,
}

/// The feed-forward part of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FfnKind {
    /// A dense SwiGLU MLP of this intermediate size.
    Dense { intermediate_size: usize },
    /// Routed experts (and the shared expert, if the model has one).
    Moe,
    /// Mixture of Lookup Experts: a shared FFN on the hidden state plus all lookup experts on
    /// the token's embedding, weighted by a softmax router (shape in `ModelSpec::mole`).
    Mole,
}

/// Tensor names of a MoLE layer, relative to `{layer_prefix}.{l}.`; `{e}` is the expert index.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoleNames {
    /// Prefix of the router's `.weight` `[experts, hidden]`, applied to the post-attention-norm
    /// hidden state.
    pub router: String,
    /// The dense shared SwiGLU FFN (gate/up/down projections below this prefix).
    pub shared: String,
    /// One lookup expert's SwiGLU FFN, applied to the normed token embedding.
    pub expert: String,
    /// Full name of the RMSNorm gain `[hidden]` applied to the embedding before the lookup
    /// experts.
    pub expert_norm: String,
}

/// Shape of the Mixture-of-Lookup-Experts layers (Jie et al., ICML 2025).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoleSpec {
    pub num_experts: usize,
    /// Intermediate size of one lookup expert's SwiGLU.
    pub expert_intermediate_size: usize,
    /// Intermediate size of the shared (dense) SwiGLU.
    pub shared_intermediate_size: usize,
    pub names: MoleNames,
}

impl MoleSpec {
    /// Full names of lookup expert `expert`'s gate, up and down weights in layer `layer`.
    pub fn expert_weights(&self, names: &TensorNames, layer: usize, expert: usize) -> [String; 3] {
        let base = names.layer(layer, &self.names.expert.replace("{e}", &expert.to_string()));
        names.expert_projections.clone().map(|p| format!("{base}.{p}.weight"))
    }
}

/// HuggingFace tensor names. Per-layer names are relative to `{layer_prefix}.{l}.`; `{e}` in
/// expert names stands for the expert index.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorNames {
    pub embed: String,
    pub final_norm: String,
    pub lm_head: String,
    pub layer_prefix: String,
    pub input_norm: String,
    pub post_attention_norm: String,
    pub attention: String,
    pub router: String,
    /// e.g. `block_sparse_moe.experts.{e}` (Mixtral) or `mlp.experts.{e}` (Qwen, OLMoE).
    pub expert: String,
    /// Projection names inside an expert: gate, up, down.
    pub expert_projections: [String; 3],
    pub dense_mlp: String,
    pub shared_expert: String,
    pub shared_expert_gate: String,
    /// Prefix of the fused expert tensors (`mlp.experts`: `.gate_up_proj`, `.down_proj`, ...).
    pub fused_experts: String,
}

impl TensorNames {
    /// The names used by the Llama-derived HF families (Qwen2/3-MoE, OLMoE); Mixtral overrides
    /// its MoE names.
    pub fn hf_default() -> Self {
        Self {
            embed: "model.embed_tokens.weight".into(),
            final_norm: "model.norm.weight".into(),
            lm_head: "lm_head.weight".into(),
            layer_prefix: "model.layers".into(),
            input_norm: "input_layernorm.weight".into(),
            post_attention_norm: "post_attention_layernorm.weight".into(),
            attention: "self_attn".into(),
            router: "mlp.gate.weight".into(),
            expert: "mlp.experts.{e}".into(),
            expert_projections: ["gate_proj".into(), "up_proj".into(), "down_proj".into()],
            dense_mlp: "mlp".into(),
            shared_expert: "mlp.shared_expert".into(),
            shared_expert_gate: "mlp.shared_expert_gate.weight".into(),
            fused_experts: "mlp.experts".into(),
        }
    }

    pub fn layer(&self, layer: usize, name: &str) -> String {
        format!("{}.{layer}.{name}", self.layer_prefix)
    }

    /// Full names of an expert's gate, up and down projection weights.
    pub fn expert_weights(&self, layer: usize, expert: usize) -> [String; 3] {
        let base = self.layer(layer, &self.expert.replace("{e}", &expert.to_string()));
        self.expert_projections.clone().map(|p| format!("{base}.{p}.weight"))
    }
}

/// A model as the runtime sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSpec {
    /// Ferry's family name (`mixtral`, `qwen2_moe`, ...).
    pub family: String,
    /// The `architectures` entry of config.json.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub rms_norm_eps: f32,
    /// Longest sequence the model supports, in tokens.
    pub max_position_embeddings: usize,
    pub rope: RopeSpec,
    pub attention: AttentionSpec,
    pub moe: MoeSpec,
    /// Lookup-expert layers' shape; Some only for the MoLE family.
    pub mole: Option<MoleSpec>,
    /// One entry per decoder layer.
    pub layers: Vec<FfnKind>,
    pub tie_word_embeddings: bool,
    pub names: TensorNames,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
}

impl ModelSpec {
    /// The layers with routed experts, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (self.layers.iter().enumerate()).filter(|(_, kind)| **kind == FfnKind::Moe).map(|(l, _)| l).collect()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Elements of one routed expert (gate + up + down).
    pub fn expert_params(&self) -> usize {
        3 * self.hidden_size * self.moe.expert_intermediate_size
    }

    /// Parameters of everything but the routed experts.
    pub fn resident_params(&self) -> usize {
        let p = self.resident_parts();
        p.projections + p.other
    }

    /// Parameters held as projection matrices on the GPU, the ones `--dense-dtype` stores:
    /// attention projections, dense and shared FFNs, routers, and the LM head (the embedding's
    /// values when tied).
    pub fn projection_params(&self) -> usize {
        self.resident_parts().projections
    }

    /// `resident_params` split into projection matrices (the LM head included) and the rest
    /// (embedding when untied, norms, biases, sinks).
    fn resident_parts(&self) -> ResidentParts {
        let h = self.hidden_size;
        let a = &self.attention;
        let q = a.num_heads * a.head_dim;
        let kv = a.num_kv_heads * a.head_dim;
        let mut attn = ResidentParts::default();
        match &a.mla {
            None => attn.projections += h * q + 2 * h * kv + q * h,
            Some(m) => {
                let query = m.q_lora_rank.map_or(h * q, |r| h * r + r * q);
                attn.other += m.q_lora_rank.unwrap_or(0) + m.kv_lora_rank; // the latent norms
                let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim);
                let kv_b = m.kv_lora_rank * a.num_heads * (m.qk_nope_head_dim + m.v_head_dim);
                attn.projections += query + kv_a + kv_b + a.num_heads * m.v_head_dim * h;
            }
        }
        if a.qkv_bias {
            attn.other += q + 2 * kv;
        }
        if a.o_bias {
            attn.other += h;
        }
        if a.sinks {
            attn.other += a.num_heads;
        }
        attn.other += match a.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * a.head_dim,
            QkNorm::WholeProjection => q + kv,
        };
        // LM head (the embedding when tied), final norm, and an untied embedding.
        let mut total = ResidentParts {
            projections: self.vocab_size * h,
            other: h + if self.tie_word_embeddings { 0 } else { self.vocab_size * h },
        };
        for ffn in &self.layers {
            total.projections += attn.projections;
            total.other += attn.other + 2 * h;
            match ffn {
                FfnKind::Dense { intermediate_size } => total.projections += 3 * h * intermediate_size,
                FfnKind::Moe => {
                    let m = &self.moe;
                    total.projections += m
                        .shared_expert
                        .as_ref()
                        .map_or(0, |s| 3 * h * s.intermediate_size + usize::from(s.sigmoid_gate) * h);
                    // Expert biases stay resident: they are small and read by every launch.
                    if m.expert_bias {
                        total.other += m.num_experts * (2 * m.expert_intermediate_size + h);
                    }
                    total.projections += h * m.num_experts;
                    total.other +=
                        (usize::from(m.router_bias) + usize::from(m.router.has_score_bias())) * m.num_experts;
                }
                // Router, expert norm and shared FFN; lookup experts (FFNs or table rows) are
                // not counted, like routed experts.
                FfnKind::Mole => {
                    if let Some(m) = &self.mole {
                        total.projections += h * m.num_experts + 3 * h * m.shared_intermediate_size;
                        total.other += h;
                    }
                }
            }
        }
        total
    }

    /// Parameters kept on the GPU besides routed experts: `resident_params` less an untied
    /// embedding, whose rows are read from the checkpoint on the host.
    pub fn gpu_resident_params(&self) -> usize {
        let embedding = if self.tie_word_embeddings { 0 } else { self.vocab_size * self.hidden_size };
        self.resident_params() - embedding
    }

    /// Parameters of all routed experts.
    pub fn expert_params_total(&self) -> usize {
        let moe_layers = self.layers.iter().filter(|f| matches!(f, FfnKind::Moe)).count();
        moe_layers * self.moe.num_experts * self.expert_params()
    }
}

/// Resident parameters by how they are stored (see `ModelSpec::resident_parts`).
#[derive(Debug, Default, Clone, Copy)]
struct ResidentParts {
    projections: usize,
    other: usize,
}
