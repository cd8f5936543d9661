//! Grouped-query self-attention with optional q/k norms, RoPE and a KV cache.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::kv_cache::KvCache;
use super::linear::{Linear, Loader};
use super::norm::rms_norm;
use super::rope;
use crate::error::Result;
use crate::spec::{AttentionSpec, ModelSpec, QkNorm};

pub struct Attention {
    spec: AttentionSpec,
    eps: f32,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
}

impl Attention {
    pub fn load(loader: &Loader, spec: &ModelSpec, layer: usize) -> Result<Self> {
        let a = &spec.attention;
        let h = spec.hidden_size;
        let q_dim = a.num_heads * a.head_dim;
        let kv_dim = a.num_kv_heads * a.head_dim;
        let prefix = spec.names.layer(layer, &spec.names.attention);
        let (q_norm_len, k_norm_len) = match a.qk_norm {
            QkNorm::None => (0, 0),
            QkNorm::PerHead => (a.head_dim, a.head_dim),
            QkNorm::WholeProjection => (q_dim, kv_dim),
        };
        let norm = |name: &str, len: usize| -> Result<Option<Tensor<1>>> {
            if len == 0 { Ok(None) } else { loader.vector(&format!("{prefix}.{name}.weight"), len).map(Some) }
        };
        Ok(Self {
            spec: a.clone(),
            eps: spec.rms_norm_eps,
            q: loader.linear(&format!("{prefix}.q_proj"), h, q_dim, a.qkv_bias)?,
            k: loader.linear(&format!("{prefix}.k_proj"), h, kv_dim, a.qkv_bias)?,
            v: loader.linear(&format!("{prefix}.v_proj"), h, kv_dim, a.qkv_bias)?,
            o: loader.linear(&format!("{prefix}.o_proj"), q_dim, h, a.o_bias)?,
            q_norm: norm("q_norm", q_norm_len)?,
            k_norm: norm("k_norm", k_norm_len)?,
        })
    }

    /// `x` `[tokens, hidden]` at positions `cache.len()..`; returns `[tokens, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<2>,
        layer: usize,
        cache: &mut KvCache,
        rope_tables: &(Tensor<3>, Tensor<3>),
        device: &Device,
    ) -> Tensor<2> {
        let a = &self.spec;
        let [tokens, _] = x.dims();
        let mut q = self.q.forward(x.clone());
        let mut k = self.k.forward(x.clone());
        let mut v = self.v.forward(x);
        if a.qk_norm == QkNorm::WholeProjection {
            q = rms_norm(q, self.q_norm.as_ref().expect("loaded with q_norm"), self.eps);
            k = rms_norm(k, self.k_norm.as_ref().expect("loaded with k_norm"), self.eps);
        }
        if let Some(c) = a.clip_qkv {
            q = q.clamp(-c, c);
            k = k.clamp(-c, c);
            v = v.clamp(-c, c);
        }
        let mut q = q.reshape([tokens, a.num_heads, a.head_dim]);
        let mut k = k.reshape([tokens, a.num_kv_heads, a.head_dim]);
        let v = v.reshape([tokens, a.num_kv_heads, a.head_dim]);
        if a.qk_norm == QkNorm::PerHead {
            q = rms_norm(q, self.q_norm.as_ref().expect("loaded with q_norm"), self.eps);
            k = rms_norm(k, self.k_norm.as_ref().expect("loaded with k_norm"), self.eps);
        }
        let (cos, sin) = rope_tables;
        let q = rope::apply(q, cos, sin).swap_dims(0, 1); // [heads, tokens, dim]
        let k = rope::apply(k, cos, sin).swap_dims(0, 1);
        let v = v.swap_dims(0, 1);

        let start = cache.len();
        let (keys, values) = cache.append(layer, k, v); // [kv_heads, start + tokens, dim]
        let total = start + tokens;
        let group = a.num_heads / a.num_kv_heads;
        // Head h reads kv head h / group, as transformers' repeat_kv.
        let expand = |t: Tensor<3>| -> Tensor<3> {
            if group == 1 {
                return t;
            }
            t.unsqueeze_dim::<4>(1).repeat_dim(1, group).reshape([a.num_heads, total, a.head_dim])
        };
        let keys = expand(keys);
        let values = expand(values);

        let scale = (a.head_dim as f32).powf(-0.5);
        let mut scores = q.matmul(keys.swap_dims(1, 2)).mul_scalar(scale); // [heads, tokens, total]
        if let Some(mask) = self.mask(start, tokens, device) {
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let probs = softmax(scores, 2);
        let out = probs.matmul(values).swap_dims(0, 1).reshape([tokens, a.num_heads * a.head_dim]);
        self.o.forward(out)
    }

    /// True where query `i` (at position `start + i`) must not see key `j`: the future, and keys
    /// outside the sliding window. `None` when nothing is masked (one token, no window).
    fn mask(&self, start: usize, tokens: usize, device: &Device) -> Option<Tensor<3, Bool>> {
        let total = start + tokens;
        let window = self.spec.sliding_window;
        let hidden = |i: usize, j: usize| {
            let pos = start + i;
            j > pos || window.is_some_and(|w| pos >= w && j <= pos - w)
        };
        let any = (0..tokens).any(|i| (0..total).any(|j| hidden(i, j)));
        if !any {
            return None;
        }
        let heads = self.spec.num_heads;
        let mut values = Vec::with_capacity(heads * tokens * total);
        for _ in 0..heads {
            for i in 0..tokens {
                values.extend((0..total).map(|j| hidden(i, j)));
            }
        }
        Some(Tensor::from_data(TensorData::new(values, [heads, tokens, total]), device))
    }
}
