//! A prefill's attention over a paged KV cache in blocks of `KEY_BLOCK` positions, with burn's
//! tiled matmuls: flash attention's online softmax at the level of tensors. Per block, the
//! scores `[heads, tokens, KEY_BLOCK]` of the pass's queries, their probabilities relative to a
//! running maximum, and the running sum and weighted values; nothing grows with the context.
//! Scratch: about three `[heads, tokens, KEY_BLOCK]` f32 tensors (with `--prefill-chunk` 512
//! and 32 heads, 96 MiB), a constant.
//!
//! A query's row meets the same blocks, `KEY_BLOCK` positions aligned to position 0 and padded
//! to full length, whatever the pages and whatever the pass, so page sizes change no bit; the
//! kernels' sums along a row do not depend on the number of rows either on the adapters
//! measured (tested: chunked prefills equal one pass bit for bit on the fixtures).

use burn::tensor::{Bool, Device, Tensor, TensorData};
use ferry_shaders::flash::{Page, Visibility};

/// Key positions per block.
pub const KEY_BLOCK: usize = 512;

/// `[tokens, heads, dv]` attention of `q` `[heads, tokens, dk]` over `pages` (in position
/// order; together they hold every key a query of the pass sees). Head `h` reads kv head
/// `h / (heads / kv_heads)`; `sinks` `[heads, 1, 1]` join each head's softmax as one more column.
pub fn blocked_attention(
    q: &Tensor<3>,
    pages: &[Page],
    sinks: Option<&Tensor<3>>,
    scale: f32,
    visibility: Visibility,
    device: &Device,
) -> Tensor<3> {
    let [heads, tokens, dk] = q.dims();
    let kv_heads = pages[0].keys.dims()[0];
    let dv = pages[0].values.dims()[2];
    let group = heads / kv_heads;
    let rows = group * tokens;
    let first = visibility.query_start;
    let end = first + tokens;
    // Each kv head's queries stacked, `[kv_heads, group * tokens, dk]` (row g * tokens + t), and
    // scaled once here rather than every block's scores.
    let stacked = q.clone().reshape([kv_heads, rows, dk]).mul_scalar(scale);
    let (mut top, mut total) = match sinks {
        Some(s) => {
            let per_row = s.clone().reshape([kv_heads, group, 1]).expand([kv_heads, group, tokens]);
            (per_row.reshape([kv_heads, rows, 1]), Tensor::ones([kv_heads, rows, 1], device))
        }
        None => (Tensor::full([kv_heads, rows, 1], f32::MIN, device), Tensor::zeros([kv_heads, rows, 1], device)),
    };
    let mut acc = Tensor::<3>::zeros([kv_heads, rows, dv], device);
    let lo = visibility.window.map_or(0, |w| (first + 1).saturating_sub(w));
    let mut block = lo / KEY_BLOCK * KEY_BLOCK;
    while block < end {
        let keys = gather(pages, block, |p| p.keys, dk, device);
        let values = gather(pages, block, |p| p.values, dv, device);
        let mut scores = stacked.clone().matmul(keys.swap_dims(1, 2));
        if let Some(mask) = block_mask(block, tokens, visibility, end, device) {
            let mask = mask.reshape([1, 1, tokens, KEY_BLOCK]).expand([kv_heads, group, tokens, KEY_BLOCK]);
            scores = scores.mask_fill(mask.reshape([kv_heads, rows, KEY_BLOCK]), f32::NEG_INFINITY);
        }
        let new_top = top.clone().max_pair(scores.clone().max_dim(2));
        let rescale = (top - new_top.clone()).exp();
        let probs = (scores - new_top.clone()).exp();
        total = total * rescale.clone() + probs.clone().sum_dim(2);
        acc = acc * rescale + probs.matmul(values);
        top = new_top;
        block += KEY_BLOCK;
    }
    (acc / total).reshape([heads, tokens, dv]).swap_dims(0, 1)
}

/// Positions `block..block + KEY_BLOCK` of the pages' `part` (`[kv_heads, n, width]` each),
/// zeros where no page holds them (before a windowed layer's first page, after the last).
fn gather<'a>(
    pages: &[Page<'a>],
    block: usize,
    part: impl Fn(&Page<'a>) -> &'a Tensor<3>,
    width: usize,
    device: &Device,
) -> Tensor<3> {
    let kv_heads = part(&pages[0]).dims()[0];
    let mut pieces = Vec::new();
    let mut at = block;
    for page in pages {
        let t = part(page);
        let (from, to) = (block.max(page.start), (block + KEY_BLOCK).min(page.start + t.dims()[1]));
        if from >= to {
            continue;
        }
        if from > at {
            pieces.push(Tensor::zeros([kv_heads, from - at, width], device));
        }
        pieces.push(t.clone().slice([0..kv_heads, from - page.start..to - page.start, 0..width]));
        at = to;
    }
    if at < block + KEY_BLOCK {
        pieces.push(Tensor::zeros([kv_heads, block + KEY_BLOCK - at, width], device));
    }
    if pieces.len() == 1 { pieces.pop().expect("one piece") } else { Tensor::cat(pieces, 1) }
}

/// `[tokens, KEY_BLOCK]`, true where query `t` (position `query_start + t`) must not see key
/// `block + j`: the future, outside the window, or past the pass's last position. None when
/// every query sees every key of the block.
fn block_mask(
    block: usize,
    tokens: usize,
    visibility: Visibility,
    end: usize,
    device: &Device,
) -> Option<Tensor<2, Bool>> {
    let first = visibility.query_start;
    let hidden = |t: usize, key: usize| {
        let pos = first + t;
        key > pos || visibility.window.is_some_and(|w| key + w <= pos)
    };
    // Keys all at or before the first query, and all inside the last query's window.
    let last = end - 1;
    let all_seen = block + KEY_BLOCK <= first + 1 && visibility.window.is_none_or(|w| block + w > last);
    if all_seen {
        return None;
    }
    let mut values = Vec::with_capacity(tokens * KEY_BLOCK);
    for t in 0..tokens {
        values.extend((block..block + KEY_BLOCK).map(|key| hidden(t, key)));
    }
    Some(Tensor::from_data(TensorData::new(values, [tokens, KEY_BLOCK]), device))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};
    use ferry_shaders::flash::{Page, Visibility, reference};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::{KEY_BLOCK, blocked_attention};
    use crate::device::Gpu;
    use crate::options::AdapterChoice;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// Keys across several blocks and pages, a pass after cached positions, a window shorter
    /// than a block, a sink column, and keys that start mid-sequence (a windowed layer's
    /// pages): equal to the definition; pages of other sizes change no bit.
    #[test]
    fn blocked_attention_matches_the_definition_and_pages_change_no_bit() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        let (heads, kv_heads, dk, dv) = (4, 2, 8, 6);
        for (tokens, key_start, n, window, sinks) in [
            (7, 0, 7, None, false),
            (300, 0, 1100, None, true),
            (600, 0, 600, Some(5), false),
            (40, 512, 700, Some(300), true),
        ] {
            let query_start = key_start + n - tokens;
            let visibility = Visibility { query_start, window };
            let (qs, ks, vs, ss) = (
                random(heads * tokens * dk, 1),
                random(kv_heads * n * dk, 2),
                random(kv_heads * n * dv, 3),
                random(heads, 4),
            );
            let q = Tensor::<3>::from_data(TensorData::new(qs.clone(), [heads, tokens, dk]), device);
            let keys = Tensor::<3>::from_data(TensorData::new(ks.clone(), [kv_heads, n, dk]), device);
            let values = Tensor::<3>::from_data(TensorData::new(vs.clone(), [kv_heads, n, dv]), device);
            let sink = sinks.then(|| Tensor::<3>::from_data(TensorData::new(ss.clone(), [heads, 1, 1]), device));
            let run = |page: usize| -> Vec<f32> {
                let mut parts = Vec::new();
                let mut from = 0;
                while from < n {
                    let to = ((key_start + from) / page * page + page - key_start).min(n);
                    let slice = |t: &Tensor<3>, d| t.clone().slice([0..kv_heads, from..to, 0..d]);
                    parts.push((slice(&keys, dk), slice(&values, dv), key_start + from));
                    from = to;
                }
                let pages: Vec<Page> = parts.iter().map(|(k, v, s)| Page { keys: k, values: v, start: *s }).collect();
                let out = blocked_attention(&q, &pages, sink.as_ref(), 0.3, visibility, device);
                out.into_data().try_to_vec().unwrap()
            };
            let whole = run(1 << 20);
            let shape = [heads, kv_heads, tokens, n, dk, dv];
            let want = reference(&qs, &ks, &vs, sinks.then_some(&ss[..]), shape, key_start, 0.3, visibility);
            let diff = whole.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let case = format!("{tokens} queries from {query_start}, keys {key_start}+{n}, window {window:?}");
            assert!(diff < 2e-5, "{case}: max diff {diff}");
            for page in [64, 3 * 64, KEY_BLOCK] {
                assert!(run(page) == whole, "{case}: pages of {page} positions changed the result");
            }
        }
    }
}
