//! Multi-head latent attention (DeepSeek-V2/V3). Each token's keys and values come from a
//! latent of `kv_lora_rank` (RMSNorm'd) expanded per head by `kv_b_proj`, plus one rope key
//! shared by all heads. The cache keeps only the latent and the rope key.
//!
//! transformers expands the cached latents into per-head keys and values. Ferry absorbs
//! `kv_b_proj` instead (DeepSeek's own inference trick), in prefill and decode alike: with
//! `W_UK`/`W_UV` the key and value halves of `kv_b_proj` for a head, `q_nope · (W_UK c) =
//! (q_nope W_UK) · c` and `Σ p (W_UV c) = W_UV (Σ p c)`, so attention runs over the latents
//! themselves, one shared key/value head of `kv_lora_rank + qk_rope_head_dim`, and costs
//! O(context x heads x kv_lora_rank) instead of expanding the whole context every pass, in memory
//! that does not grow with it. Only the summation order differs from the expanded form, which
//! remains for the pass that reports attention probabilities (`--importance attention`).
//!
//! DeepSeek's RoPE rotates adjacent lane pairs (2i, 2i+1). Loading reorders the rope rows of the
//! query and `kv_a_proj_with_mqa` projections to (evens, odds), which turns that into the
//! runtime's rotate-half RoPE; the scores are unchanged, since queries and keys are permuted
//! alike.

use burn::tensor::{Device, Tensor, TensorData};

use super::attention::{KeySpan, attend, attention_probs, joined};
use super::kv_cache::{KvCache, PageView};
use super::linear::{Linear, Loader};
use super::rope;
use crate::error::Result;
use crate::spec::{MlaSpec, ModelSpec};
use ferry_shaders::flash::{Page, Visibility};
use ferry_shaders::norm::rms_norm;

/// transformers builds `q_a_layernorm` and `kv_a_layernorm` without passing `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

pub struct MlaAttention {
    spec: MlaSpec,
    heads: usize,
    /// q-LoRA's down projection and its norm (`q_a_proj`, `q_a_layernorm`), when present.
    q_lora: Option<(Linear, Tensor<1>)>,
    /// `q_proj`, or q-LoRA's `q_b_proj`.
    q: Linear,
    kv_a: Linear,
    kv_a_norm: Tensor<1>,
    kv_b: Linear,
    /// `kv_b_proj`'s key half per head `[heads, qk_nope, kv_lora_rank]` and its value half,
    /// transposed, `[heads, kv_lora_rank, v]`: the absorbed decode's weights.
    w_uk: Tensor<3>,
    w_uv: Tensor<3>,
    o: Linear,
}

impl MlaAttention {
    pub fn load(loader: &Loader, spec: &ModelSpec, m: &MlaSpec, layer: usize) -> Result<Self> {
        let a = &spec.attention;
        let (h, heads) = (spec.hidden_size, a.num_heads);
        let prefix = spec.names.layer(layer, &spec.names.attention);
        let bias = a.qkv_bias;
        let qk = m.qk_head_dim();
        let q_rows: Option<Vec<usize>> = m.rope_interleaved.then(|| {
            (0..heads).flat_map(|head| deinterleave(head * qk, m.qk_nope_head_dim, m.qk_rope_head_dim)).collect()
        });
        let (q_lora, q) = match m.q_lora_rank {
            None => (None, loader.linear_rows(&format!("{prefix}.q_proj"), h, heads * qk, false, q_rows.as_deref())?),
            Some(r) => (
                Some((
                    loader.linear(&format!("{prefix}.q_a_proj"), h, r, bias)?,
                    loader.vector(&format!("{prefix}.q_a_layernorm.weight"), r)?,
                )),
                loader.linear_rows(&format!("{prefix}.q_b_proj"), r, heads * qk, false, q_rows.as_deref())?,
            ),
        };
        let latent = m.kv_lora_rank + m.qk_rope_head_dim;
        let kv_rows = m.rope_interleaved.then(|| deinterleave(0, m.kv_lora_rank, m.qk_rope_head_dim));
        let (w_uk, w_uv) = absorbed(loader, &format!("{prefix}.kv_b_proj.weight"), heads, m)?;
        Ok(Self {
            q_lora,
            q,
            w_uk,
            w_uv,
            kv_a: loader.linear_rows(&format!("{prefix}.kv_a_proj_with_mqa"), h, latent, bias, kv_rows.as_deref())?,
            kv_a_norm: loader.vector(&format!("{prefix}.kv_a_layernorm.weight"), m.kv_lora_rank)?,
            kv_b: loader.linear(
                &format!("{prefix}.kv_b_proj"),
                m.kv_lora_rank,
                heads * (m.qk_nope_head_dim + m.v_head_dim),
                false,
            )?,
            o: loader.linear(&format!("{prefix}.o_proj"), heads * m.v_head_dim, h, a.o_bias)?,
            heads,
            spec: m.clone(),
        })
    }

    /// As `Attention::forward`: `x` `[tokens, hidden]` at positions `cache.len()..`.
    pub fn forward(
        &self,
        x: Tensor<2>,
        layer: usize,
        cache: &mut KvCache,
        rope_tables: &(Tensor<3>, Tensor<3>),
        want_received: bool,
        device: &Device,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let m = &self.spec;
        let heads = self.heads;
        let [tokens, _] = x.dims();
        let (nope, rope_dim, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
        let qk = nope + rope_dim;
        let q_in = match &self.q_lora {
            None => x.clone(),
            Some((a, norm)) => rms_norm(a.forward(x.clone()), norm, LATENT_NORM_EPS),
        };
        let q = self.q.forward(q_in).reshape([tokens, heads, qk]);
        let (cos, sin) = rope_tables;
        let q_nope = q.clone().slice([0..tokens, 0..heads, 0..nope]);
        let q_pe = rope::apply(q.slice([0..tokens, 0..heads, nope..qk]), cos, sin);
        let q = Tensor::cat(vec![q_nope, q_pe], 2).swap_dims(0, 1); // [heads, tokens, qk]

        let compressed = self.kv_a.forward(x);
        let latent = rms_norm(compressed.clone().slice([0..tokens, 0..r]), &self.kv_a_norm, LATENT_NORM_EPS);
        let k_pe = rope::apply(compressed.slice([0..tokens, r..r + rope_dim]).reshape([tokens, 1, rope_dim]), cos, sin);
        let start = cache.len();
        let total = start + tokens;
        // Pages of [1, positions, r + rope]: each position's latent, then its rope key.
        let pages = cache.append_joint(layer, vec![latent.reshape([1, tokens, r]), k_pe.swap_dims(0, 1)]);
        let kernels = self.absorbed_paged(&q, &pages, start, device);
        // The burn path: a backend other than CubeCL, or the probabilities big-little reads
        // (beside the kernels' output, so that the output is the same with and without them).
        let burn = |q: Tensor<3>, want_received: bool| {
            let (cached, _) = joined(pages.iter().map(|p| p.keys.clone()).collect(), &pages);
            let span = KeySpan { start, tokens, key_start: 0, keys: total, window: None };
            if tokens == 1 {
                self.absorbed(q, cached, &span, want_received, device)
            } else {
                let latents = cached.clone().slice([0..1, 0..total, 0..r]);
                let k_pes = cached.slice([0..1, 0..total, r..r + rope_dim]);
                self.expanded(q, latents, k_pes, &span, want_received, device)
            }
        };
        let (out, received) = match kernels {
            Some(out) => (out, if want_received { burn(q, true).1 } else { None }),
            None => burn(q, want_received),
        };
        (self.o.forward(out.reshape([tokens, heads * m.v_head_dim])), received)
    }

    /// Attention over keys and values expanded per head from every cached latent. `q` is
    /// `[heads, tokens, qk]`; returns `[tokens, heads, v]`.
    fn expanded(
        &self,
        q: Tensor<3>,
        latents: Tensor<3>,
        k_pes: Tensor<3>,
        span: &KeySpan,
        want_received: bool,
        device: &Device,
    ) -> (Tensor<3>, Option<Tensor<2>>) {
        let m = &self.spec;
        let (heads, total, nope, r) = (self.heads, span.keys, m.qk_nope_head_dim, m.kv_lora_rank);
        let kv = self.kv_b.forward(latents.reshape([total, r])).reshape([total, heads, nope + m.v_head_dim]);
        let k_nope = kv.clone().slice([0..total, 0..heads, 0..nope]).swap_dims(0, 1);
        let values = kv.slice([0..total, 0..heads, nope..nope + m.v_head_dim]).swap_dims(0, 1);
        let keys = Tensor::cat(vec![k_nope, k_pes.repeat_dim(0, heads)], 2); // [heads, total, qk]
        let scores = q.matmul(keys.swap_dims(1, 2)).mul_scalar(m.softmax_scale);
        let probs = attention_probs(scores, span, None, device);
        let received = want_received.then(|| span.received(probs.clone(), device));
        (probs.matmul(values).swap_dims(0, 1), received)
    }

    /// Attention over the latents themselves, `kv_b_proj` absorbed into the query and output
    /// (see the module comment). `q` is `[heads, tokens, qk]`, `cached` the cache's
    /// `[1, positions, r + rope]`, which is the one shared key as it lies, its first `r` lanes the
    /// values; returns `[tokens, heads, v]`.
    fn absorbed(
        &self,
        q: Tensor<3>,
        cached: Tensor<3>,
        span: &KeySpan,
        want_received: bool,
        device: &Device,
    ) -> (Tensor<3>, Option<Tensor<2>>) {
        let m = &self.spec;
        let (heads, tokens, total) = (self.heads, span.tokens, span.keys);
        let (nope, rope_dim, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
        let q_nope = q.clone().slice([0..heads, 0..tokens, 0..nope]);
        let q_pe = q.slice([0..heads, 0..tokens, nope..nope + rope_dim]);
        // [heads, tokens, r + rope] against the one shared key [total, r + rope].
        let q_latent =
            Tensor::cat(vec![q_nope.matmul(self.w_uk.clone()), q_pe], 2).reshape([heads * tokens, r + rope_dim]);
        let keys = cached.reshape([total, r + rope_dim]);
        let latents = keys.clone().slice([0..total, 0..r]);
        let scores = q_latent.matmul(keys.transpose()).mul_scalar(m.softmax_scale).reshape([heads, tokens, total]);
        let probs = attention_probs(scores, span, None, device);
        let received = want_received.then(|| span.received(probs.clone(), device));
        let mixed = probs.reshape([heads * tokens, total]).matmul(latents).reshape([heads, tokens, r]);
        (mixed.matmul(self.w_uv.clone()).swap_dims(0, 1), received)
    }
}

impl MlaAttention {
    /// The absorbed form over the paged cache with ferry-shaders' kernels (every head against
    /// the one latent "head"; its first `r` lanes are the values), for any number of tokens: its
    /// scratch does not grow with the context, unlike the expanded form's per-head keys. `q` is
    /// `[heads, tokens, qk]`; returns `[tokens, heads, v]`, or None where the backend is not
    /// CubeCL.
    fn absorbed_paged(&self, q: &Tensor<3>, pages: &[PageView], start: usize, device: &Device) -> Option<Tensor<3>> {
        let m = &self.spec;
        let [heads, tokens, _] = q.dims();
        let (nope, rope_dim, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
        let q_nope = q.clone().slice([0..heads, 0..tokens, 0..nope]);
        let q_pe = q.clone().slice([0..heads, 0..tokens, nope..nope + rope_dim]);
        let q_latent = Tensor::cat(vec![q_nope.matmul(self.w_uk.clone()), q_pe], 2);
        let values: Vec<Tensor<3>> =
            pages.iter().map(|p| p.keys.clone().slice([0..1, 0..p.keys.dims()[1], 0..r])).collect();
        let views: Vec<Page> =
            pages.iter().zip(&values).map(|(p, v)| Page { keys: &p.keys, values: v, start: p.start }).collect();
        let visibility = Visibility { query_start: start, window: None };
        let mixed = attend(&q_latent, &views, None, m.softmax_scale, visibility, device)?; // [tokens, heads, r]
        Some(mixed.swap_dims(0, 1).matmul(self.w_uv.clone()).swap_dims(0, 1))
    }
}

/// `kv_b_proj` `[heads * (nope + v), r]` split per head into the key half `[heads, nope, r]` and
/// the value half transposed `[heads, r, v]`.
fn absorbed(loader: &Loader, name: &str, heads: usize, m: &MlaSpec) -> Result<(Tensor<3>, Tensor<3>)> {
    let (nope, v, r) = (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
    let w = loader.store.f32(name, &[heads * (nope + v), r])?;
    let mut uk = Vec::with_capacity(heads * nope * r);
    let mut uv = vec![0f32; heads * r * v];
    for h in 0..heads {
        let head = &w[h * (nope + v) * r..(h + 1) * (nope + v) * r];
        uk.extend_from_slice(&head[..nope * r]);
        for row in 0..v {
            for c in 0..r {
                uv[(h * r + c) * v + row] = head[(nope + row) * r + c];
            }
        }
    }
    let device = loader.device;
    Ok((
        Tensor::from_data(TensorData::new(uk, [heads, nope, r]), device),
        Tensor::from_data(TensorData::new(uv, [heads, r, v]), device),
    ))
}

/// Output rows for one `[skip | rope]` block at `offset`: the first `skip` rows as they are, then
/// the rope lanes' even rows followed by their odd rows.
fn deinterleave(offset: usize, skip: usize, rope: usize) -> Vec<usize> {
    let lanes = offset + skip;
    (offset..lanes)
        .chain((0..rope).step_by(2).map(|i| lanes + i))
        .chain((1..rope).step_by(2).map(|i| lanes + i))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn deinterleave_puts_even_rope_lanes_first() {
        assert_eq!(super::deinterleave(10, 2, 6), vec![10, 11, 12, 14, 16, 13, 15, 17]);
    }
}
