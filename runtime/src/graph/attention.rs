//! Grouped-query self-attention with optional q/k norms, RoPE and a KV cache.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::blocked::{KEY_BLOCK, blocked_attention};
use super::kv_cache::KvCache;
use super::kv_cache::PageView;
use super::linear::{Linear, Loader};
use super::rope;
use crate::error::Result;
use crate::spec::{AttentionSpec, ModelSpec, QkNorm};
use ferry_shaders::attention::decode_attention;
use ferry_shaders::flash::{Page, Visibility, flash_attention};
use ferry_shaders::norm::rms_norm;

pub struct Attention {
    spec: AttentionSpec,
    /// This layer's sliding window (GPT-OSS alternates windowed and full layers).
    window: Option<usize>,
    /// Per-head sink logits `[heads, 1, 1]` (GPT-OSS).
    sinks: Option<Tensor<3>>,
    eps: f32,
    /// The q, k and v projections side by side (`[q | k | v]` outputs), one launch per pass.
    qkv: Linear,
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
        let sinks = if a.sinks {
            Some(loader.vector(&format!("{prefix}.sinks"), a.num_heads)?.reshape([a.num_heads, 1, 1]))
        } else {
            None
        };
        Ok(Self {
            spec: a.clone(),
            window: a.window(layer),
            sinks,
            eps: spec.rms_norm_eps,
            qkv: Linear::concat(&[
                &loader.linear(&format!("{prefix}.q_proj"), h, q_dim, a.qkv_bias)?,
                &loader.linear(&format!("{prefix}.k_proj"), h, kv_dim, a.qkv_bias)?,
                &loader.linear(&format!("{prefix}.v_proj"), h, kv_dim, a.qkv_bias)?,
            ])?,
            o: loader.linear(&format!("{prefix}.o_proj"), q_dim, h, a.o_bias)?,
            q_norm: norm("q_norm", q_norm_len)?,
            k_norm: norm("k_norm", k_norm_len)?,
        })
    }

    /// `x` `[tokens, hidden]` at positions `cache.len()..`; returns `[tokens, hidden]` and, when
    /// `want_received`, the attention each token received (`received_attention`, `[tokens, 1]`,
    /// still on the GPU so that the MoE block reads it back with its router logits).
    pub fn forward(
        &self,
        x: Tensor<2>,
        layer: usize,
        cache: &mut KvCache,
        rope_tables: &(Tensor<3>, Tensor<3>),
        want_received: bool,
        device: &Device,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let a = &self.spec;
        let [tokens, _] = x.dims();
        let (q_dim, kv_dim) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let qkv = self.qkv.forward(x);
        let (cos, sin) = rope_tables;
        let (hd, nh, nkv) = (a.head_dim, a.num_heads, a.num_kv_heads);
        let v = qkv.clone().slice([0..tokens, q_dim + kv_dim..q_dim + 2 * kv_dim]);
        let (q, k, v) = if a.qk_norm == QkNorm::None && a.clip_qkv.is_none() {
            // q and k still sit side by side: one rotation for both.
            let qk = qkv.slice([0..tokens, 0..q_dim + kv_dim]).reshape([tokens, nh + nkv, hd]);
            let qk = rope::apply(qk, cos, sin);
            (qk.clone().slice([0..tokens, 0..nh, 0..hd]), qk.slice([0..tokens, nh..nh + nkv, 0..hd]), v)
        } else {
            let mut q = qkv.clone().slice([0..tokens, 0..q_dim]);
            let mut k = qkv.slice([0..tokens, q_dim..q_dim + kv_dim]);
            let mut v = v;
            if a.qk_norm == QkNorm::WholeProjection {
                q = rms_norm(q, self.q_norm.as_ref().expect("loaded with q_norm"), self.eps);
                k = rms_norm(k, self.k_norm.as_ref().expect("loaded with k_norm"), self.eps);
            }
            if let Some(c) = a.clip_qkv {
                q = q.clamp(-c, c);
                k = k.clamp(-c, c);
                v = v.clamp(-c, c);
            }
            let mut q = q.reshape([tokens, nh, hd]);
            let mut k = k.reshape([tokens, nkv, hd]);
            if a.qk_norm == QkNorm::PerHead {
                q = rms_norm(q, self.q_norm.as_ref().expect("loaded with q_norm"), self.eps);
                k = rms_norm(k, self.k_norm.as_ref().expect("loaded with k_norm"), self.eps);
            }
            (rope::apply(q, cos, sin), rope::apply(k, cos, sin), v)
        };
        let q = q.swap_dims(0, 1); // [heads, tokens, dim]
        let k = k.swap_dims(0, 1);
        let v = v.reshape([tokens, nkv, hd]).swap_dims(0, 1);

        let start = cache.len();
        // Every page this pass can see, the new positions included.
        let pages = cache.append(layer, k, v);
        let scale = (a.head_dim as f32).powf(-0.5);
        let views: Vec<Page> = pages
            .iter()
            .map(|p| Page { keys: &p.keys, values: p.values.as_ref().expect("a k/v cache"), start: p.start })
            .collect();
        let visibility = Visibility { query_start: start, window: self.window };
        match attend(&q, &views, self.sinks.as_ref(), scale, visibility, device) {
            Some(out) => {
                // The probabilities big-little reads come from burn's ops beside the kernels'
                // output, so that the output is the same with and without them.
                let received = want_received.then(|| self.burn_attention(q, &pages, start, scale, true, device).1);
                (self.o.forward(out.reshape([tokens, a.num_heads * a.head_dim])), received.flatten())
            }
            None => {
                let (out, received) = self.burn_attention(q, &pages, start, scale, want_received, device);
                (self.o.forward(out), received)
            }
        }
    }

    /// Attention with burn's ops over the pages joined (a backend other than CubeCL, or the
    /// probabilities wanted): `[tokens, heads * head_dim]` and, when `want_received`, the
    /// attention each token received.
    fn burn_attention(
        &self,
        q: Tensor<3>,
        pages: &[PageView],
        start: usize,
        scale: f32,
        want_received: bool,
        device: &Device,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let a = &self.spec;
        let tokens = q.dims()[1];
        let (keys, key_start) = joined(pages.iter().map(|p| p.keys.clone()).collect(), pages);
        let (values, _) = joined(pages.iter().map(|p| p.values.clone().expect("a k/v cache")).collect(), pages);
        let span = KeySpan { start, tokens, key_start, keys: keys.dims()[1], window: self.window };
        // Head h reads kv head h / group, as transformers' repeat_kv; instead of repeating the
        // keys and values `group` times, each kv head's queries are stacked into one matmul
        // (`[kv_heads, group * tokens, dim]`), so the cache is read once per layer, not `group`.
        let group = a.num_heads / a.num_kv_heads;
        let stacked = |t: Tensor<3>, width: usize| t.reshape([a.num_kv_heads, group * tokens, width]);
        let per_head = |t: Tensor<3>, width: usize| t.reshape([a.num_heads, tokens, width]);

        let scores = stacked(q, a.head_dim).matmul(keys.swap_dims(1, 2)).mul_scalar(scale);
        let probs = attention_probs(per_head(scores, span.keys), &span, self.sinks.as_ref(), device);
        let received = want_received.then(|| span.received(probs.clone(), device));
        let out = per_head(stacked(probs, span.keys).matmul(values), a.head_dim)
            .swap_dims(0, 1)
            .reshape([tokens, a.num_heads * a.head_dim]);
        (out, received)
    }
}

/// `[tokens, heads, dv]` attention of `q` `[heads, tokens, dk]` over a paged cache, in memory
/// that does not grow with the context, or None where the backend is not CubeCL. A prefill runs
/// in blocks of keys through burn's matmuls (`blocked`); a decode step whose keys sit on one
/// page, all visible, takes the one-launch decode kernel, and one across pages the flash kernel.
pub fn attend(
    q: &Tensor<3>,
    pages: &[Page],
    sinks: Option<&Tensor<3>>,
    scale: f32,
    visibility: Visibility,
    device: &Device,
) -> Option<Tensor<3>> {
    let [heads, tokens, _] = q.dims();
    if tokens > 1 {
        return Some(blocked_attention(q, pages, sinks, scale, visibility, device));
    }
    if let [page] = pages
        && visibility.window.is_none_or(|w| page.start + w > visibility.query_start)
    {
        let dv = page.values.dims()[2];
        return decode_attention(q, page.keys, page.values, sinks, scale).map(|out| out.reshape([1, heads, dv]));
    }
    flash_attention(q, pages, sinks, scale, visibility)
}

/// Attention's scratch beyond its output for a pass of `queries` queries over any context: a
/// prefill's scores, probabilities and mask for one block of keys (`blocked`), and its running
/// maximum and sum. With `--prefill-chunk` queries at most, a constant. (A decode step keeps at
/// most one float per key and head of one page, within the page's binding.)
pub fn attention_scratch_bytes(heads: usize, queries: usize) -> u64 {
    if queries <= 1 {
        return (heads * 2 * 4) as u64;
    }
    (heads * queries * (3 * KEY_BLOCK + 2) * 4) as u64
}

/// The pages' tensors `[heads, n_i, dim]` joined along positions, and the first position.
pub fn joined(parts: Vec<Tensor<3>>, pages: &[PageView]) -> (Tensor<3>, usize) {
    let start = pages.first().map_or(0, |p| p.start);
    let joined = if parts.len() == 1 { parts.into_iter().next().expect("one page") } else { Tensor::cat(parts, 1) };
    (joined, start)
}

/// Which keys a pass's queries attend over: queries at positions `start..start + tokens`, keys
/// at `key_start..key_start + keys` (all cached positions, or a windowed layer's recent ones).
pub struct KeySpan {
    pub start: usize,
    pub tokens: usize,
    pub key_start: usize,
    pub keys: usize,
    pub window: Option<usize>,
}

impl KeySpan {
    /// True where query `i` must not see key `j` (both indices within the pass): the future, and
    /// keys outside the sliding window (a query at `p` sees `p - window < key <= p`).
    pub fn hidden(&self, i: usize, j: usize) -> bool {
        let (pos, key) = (self.start + i, self.key_start + j);
        key > pos || self.window.is_some_and(|w| pos >= w && key <= pos - w)
    }

    /// `hidden` for every (head, query, key). `None` when nothing is masked.
    fn mask(&self, heads: usize, device: &Device) -> Option<Tensor<3, Bool>> {
        let any = (0..self.tokens).any(|i| (0..self.keys).any(|j| self.hidden(i, j)));
        if !any {
            return None;
        }
        let mut values = Vec::with_capacity(heads * self.tokens * self.keys);
        for _ in 0..heads {
            for i in 0..self.tokens {
                values.extend((0..self.keys).map(|j| self.hidden(i, j)));
            }
        }
        Some(Tensor::from_data(TensorData::new(values, [heads, self.tokens, self.keys]), device))
    }

    /// `received_attention` over this span's keys (this pass's tokens are its last `tokens`).
    pub fn received(&self, probs: Tensor<3>, device: &Device) -> Tensor<2> {
        received_attention(probs, self.keys - self.tokens, |i, j| !self.hidden(i, j), device)
    }
}

/// Masked softmax of `scores` `[heads, tokens, keys]`; with `sinks` `[heads, 1, 1]`, each head's
/// sink logit joins the softmax as one more column and is dropped afterwards.
pub fn attention_probs(mut scores: Tensor<3>, span: &KeySpan, sinks: Option<&Tensor<3>>, device: &Device) -> Tensor<3> {
    let [heads, tokens, keys] = scores.dims();
    if let Some(mask) = span.mask(heads, device) {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    match sinks {
        None => softmax(scores, 2),
        Some(sinks) => {
            let column = sinks.clone().expand([heads, tokens, 1]);
            softmax(Tensor::cat(vec![scores, column], 2), 2).slice([0..heads, 0..tokens, 0..keys])
        }
    }
}

/// Attention received by each token of a pass, relative to a uniform share: `[tokens, 1]`, from
/// `probs` `[heads, tokens, start + tokens]` (this pass's queries over every cached key), where
/// `visible(i, j)` says whether query `i` (position `start + i`) sees key position `j`.
///
/// For the token at position `p = start + t` the score is the mean, over heads and over the
/// queries of this pass that see it, of `a[i, p] * n_i`, `n_i` being the number of keys query `i`
/// sees. Both normalisations keep a token from scoring high for its position alone: averaging
/// (rather than summing) over the queries that see it removes the advantage of being seen by
/// more of them, and scaling by `n_i` removes the advantage of being seen by early queries, whose
/// attention is spread over fewer keys. Under uniform attention every token scores exactly 1.
///
/// Decode (one new token): nothing but the token itself has attended to it yet, so its score is
/// its self-attention times the keys it sees: the same formula over the queries that exist, and
/// the same value the last token of a prefill gets. Attention that later tokens pay to it is never
/// counted, since its experts have already run by then. One query is a noisier estimate than a
/// prefill's average, so against a threshold made of prompt scores more decode tokens come out
/// big than `--big-fraction` asks (measured in BENCHMARKS.md).
pub fn received_attention(
    probs: Tensor<3>,
    start: usize,
    visible: impl Fn(usize, usize) -> bool,
    device: &Device,
) -> Tensor<2> {
    let [heads, tokens, total] = probs.dims();
    let keys_seen: Vec<f32> = (0..tokens).map(|i| (0..total).filter(|&j| visible(i, j)).count() as f32).collect();
    let per_query = Tensor::<1>::from_data(TensorData::new(keys_seen, [tokens]), device).reshape([1, tokens, 1]);
    let seen_by: Vec<f32> = (0..tokens)
        .map(|t| {
            let queries = (0..tokens).filter(|&i| visible(i, start + t)).count();
            1.0 / (heads * queries.max(1)) as f32
        })
        .collect();
    let mean = Tensor::<2>::from_data(TensorData::new(seen_by, [tokens, 1]), device);
    // Keys of this pass only: earlier positions already made their big/little choice.
    let own = probs.slice([0..heads, 0..tokens, start..total]);
    (own * per_query).sum_dim(1).sum_dim(0).reshape([tokens, 1]) * mean
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Tensor, TensorData};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::received_attention;
    use crate::device::Gpu;
    use crate::options::AdapterChoice;

    /// Plain-Rust reference: for key position `start + t`, the mean over heads and over the
    /// queries that see it of `a[h][i][start + t]` times the keys query `i` sees.
    fn reference(
        probs: &[f32],
        [heads, tokens, total]: [usize; 3],
        start: usize,
        visible: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<f32> {
        (0..tokens)
            .map(|t| {
                let mut sum = 0.0;
                let mut count = 0;
                for h in 0..heads {
                    for i in (0..tokens).filter(|&i| visible(i, start + t)) {
                        let seen = (0..total).filter(|&j| visible(i, j)).count() as f32;
                        sum += probs[(h * tokens + i) * total + start + t] * seen;
                        count += 1;
                    }
                }
                sum / count as f32
            })
            .collect()
    }

    /// Random causal attention (with and without a sliding window, prefill and a continuation
    /// after cached tokens, and one decoded token) matches the reference; uniform attention
    /// scores every token 1, whatever its position.
    #[test]
    fn received_attention_matches_a_cpu_reference_and_is_one_under_uniform_attention() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        let mut rng = StdRng::seed_from_u64(3);
        let heads = 3;
        for (start, tokens, window) in [(0, 7, None), (0, 9, Some(3)), (4, 5, None), (6, 1, None), (5, 4, Some(4))] {
            let total = start + tokens;
            let visible = move |i: usize, j: usize| {
                let pos = start + i;
                j <= pos && window.is_none_or(|w| pos < w || j > pos - w)
            };
            for uniform in [false, true] {
                let mut scores = Vec::with_capacity(heads * tokens * total);
                for _ in 0..heads {
                    for i in 0..tokens {
                        for j in 0..total {
                            let s = if uniform { 0.0 } else { rng.random_range(-3.0f32..3.0) };
                            scores.push(if visible(i, j) { s } else { f32::NEG_INFINITY });
                        }
                    }
                }
                let probs = softmax(Tensor::<3>::from_data(TensorData::new(scores, [heads, tokens, total]), device), 2);
                let host: Vec<f32> = probs.clone().into_data().try_into_vec().unwrap();
                let got: Vec<f32> =
                    received_attention(probs, start, visible, device).into_data().try_into_vec().unwrap();
                let want = reference(&host, [heads, tokens, total], start, &visible);
                for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "start {start} window {window:?} token {t}: {g} vs {w}"
                    );
                    if uniform {
                        assert!((g - 1.0).abs() < 1e-5, "uniform attention, token {t}: {g}");
                    }
                }
            }
        }
    }
}
