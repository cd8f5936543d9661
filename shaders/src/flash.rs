//! Attention of many queries over a paged key/value cache in bounded memory: flash attention's
//! online softmax, with no `[heads, tokens, keys]` score matrix. Each unit owns one (head, query)
//! and folds the keys it sees into a running maximum, sum and weighted sum of values held in its
//! registers; between pages that state (two floats and the `dv` lanes) waits in `stats` and the
//! output. Causal masks, grouped heads, GPT-OSS's sink column and sliding windows are which keys a
//! query visits. Scratch: two floats per (head, query) of a pass, nothing per key.
//!
//! A query folds its keys one at a time in position order, whatever the pages and whatever the
//! pass it belongs to, so its result is bit-identical across page sizes and prefill chunk sizes.
//!
//! The runtime uses it for a decode step whose keys span several pages (a decode step on one page
//! takes `attention::decode_attention`, which splits the keys of its one query across a
//! workgroup; a prefill takes blocks of keys through tiled matmuls, 3.4x faster than this kernel
//! for 512 queries over 4096 keys of OLMoE's heads on lavapipe). A GPU would want the keys of a
//! long decode split across units as well: one unit per query leaves a workgroup one busy unit.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;
use cubecl::{CubeCount, CubeDim};

use burn_cubecl::tensor::CubeTensor;

use crate::bridge::{from_cube, try_cube_float};

/// Positions a KV page holds a multiple of (pages stay aligned to blocks of work a split-key
/// variant of this kernel would take).
pub const BLOCK: usize = 64;

/// Queries per cube, one per unit.
const QUERIES: usize = 64;

/// Head sizes the kernel unrolls, keeping a query and its sums in registers (MLA's absorbed
/// heads, 512 and more lanes, loop instead).
const UNROLLED: usize = 128;

/// One page of a layer's cache: `keys` `[kv_heads, n, dk]` and `values` `[kv_heads, n, dv]` (any
/// strides) hold positions `start..start + n`.
pub struct Page<'a> {
    pub keys: &'a Tensor<3>,
    pub values: &'a Tensor<3>,
    pub start: usize,
}

/// Which keys a query sees: the query at position `p` sees `p - window < key <= p` (every key up
/// to `p` without a window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// Position of the first query.
    pub query_start: usize,
    pub window: Option<usize>,
}

/// `[tokens, heads, dv]` attention of `q` `[heads, tokens, dk]` (any strides) over `pages`, in
/// page order, or None where the backend is not CubeCL or there are no pages. Head `h` reads kv
/// head `h / (heads / kv_heads)`; `sinks` `[heads, 1, 1]`.
pub fn flash_attention(
    q: &Tensor<3>,
    pages: &[Page<'_>],
    sinks: Option<&Tensor<3>>,
    scale: f32,
    visibility: Visibility,
) -> Option<Tensor<3>> {
    let [heads, tokens, _] = q.dims();
    let first = pages.first()?;
    let kv_heads = first.keys.dims()[0];
    let dv = first.values.dims()[2];
    let qc = try_cube_float(q.clone()).ok()?;
    let sc = match sinks {
        Some(s) => Some(try_cube_float(s.clone()).ok()?),
        None => None,
    };
    let client = qc.client.clone();
    let empty = |shape: [usize; 3]| {
        burn_cubecl::ops::numeric::empty_device_dtype(client.clone(), qc.device.clone(), shape.into(), qc.dtype)
    };
    let out = empty([tokens, heads, dv]);
    let stats = empty([tokens, heads, 2]);
    let dtype = dtype_to_storage_type(qc.dtype);
    let has_sinks = sc.is_some();
    let count = CubeCount::Static(tokens.div_ceil(QUERIES) as u32, heads as u32, 1);
    let dim = CubeDim::new_1d(QUERIES as u32);
    // No window: a bound no position reaches.
    let window = visibility.window.map_or(u32::MAX, |w| w.min(u32::MAX as usize) as u32);
    let dk = q.dims()[2];
    // The kernel reads keys and values with unit stride along their last axis.
    let unit_stride = |c: CubeTensor| if c.meta.strides[2] == 1 { c } else { burn_cubecl::kernel::into_contiguous(c) };
    for (i, page) in pages.iter().enumerate() {
        let kc = unit_stride(try_cube_float(page.keys.clone()).ok()?);
        let vc = unit_stride(try_cube_float(page.values.clone()).ok()?);
        crate::launches::record(&count, &dim);
        kernel::flash_kernel::launch(
            &client,
            count.clone(),
            dim,
            qc.clone().into_tensor_arg(),
            kc.into_tensor_arg(),
            vc.into_tensor_arg(),
            sc.clone().unwrap_or_else(|| qc.clone()).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            (heads / kv_heads) as u32,
            scale,
            visibility.query_start as u32,
            page.start as u32,
            window,
            dk,
            dv,
            has_sinks,
            i == 0,
            i + 1 == pages.len(),
            dtype,
        );
    }
    Some(from_cube(out))
}

/// Attention on the host, by its definition: `q` `[heads, tokens, dk]`, `keys` `[kv_heads, n,
/// dk]` and `values` `[kv_heads, n, dv]` holding positions `key_start..key_start + n`
/// (contiguous), `sinks` `[heads]`; returns `[tokens, heads, dv]`.
#[allow(clippy::too_many_arguments)] // the shapes and the mask, as the kernel takes them
pub fn reference(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    sinks: Option<&[f32]>,
    [heads, kv_heads, tokens, n, dk, dv]: [usize; 6],
    key_start: usize,
    scale: f32,
    visibility: Visibility,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let mut out = vec![0f32; tokens * heads * dv];
    for h in 0..heads {
        let kv = h / group;
        for t in 0..tokens {
            let pos = visibility.query_start + t;
            let seen = |j: usize| {
                let key = key_start + j;
                key <= pos && visibility.window.is_none_or(|w| key + w > pos)
            };
            let scores: Vec<Option<f32>> = (0..n)
                .map(|j| {
                    seen(j).then(|| {
                        (0..dk).map(|i| q[(h * tokens + t) * dk + i] * keys[(kv * n + j) * dk + i]).sum::<f32>() * scale
                    })
                })
                .collect();
            let sink = sinks.map(|s| s[h]);
            let top = scores.iter().flatten().copied().chain(sink).fold(f32::MIN, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| s.map_or(0.0, |s| (s - top).exp())).collect();
            let total = exps.iter().sum::<f32>() + sink.map_or(0.0, |s| (s - top).exp());
            for i in 0..dv {
                let mixed: f32 = (0..n).map(|j| exps[j] * values[(kv * n + j) * dv + i]).sum();
                out[(t * heads + h) * dv + i] = mixed / total;
            }
        }
    }
    out
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use super::{QUERIES, UNROLLED};

    /// One unit per (head, query), `QUERIES` queries of one head per cube (they read the same
    /// keys). Each unit folds its visible keys one at a time, in position order, into a running
    /// maximum, sum and weighted sum of values (`dv` lanes in registers); `first` starts that
    /// state, `last` divides by the sum, other pages carry it in `stats` and `out`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and scalars, passed through
    pub(super) fn flash_kernel<F: Float>(
        q: &Tensor<F>,         // [heads, tokens, dk]
        keys: &Tensor<F>,      // [kv_heads, n, dk]: positions page_start..page_start + n
        values: &Tensor<F>,    // [kv_heads, n, dv]
        sinks: &Tensor<F>,     // [heads, 1, 1] (when has_sinks)
        out: &mut Tensor<F>,   // [tokens, heads, dv]: the weighted sum so far, then the result
        stats: &mut Tensor<F>, // [tokens, heads, 2]: running maximum and sum
        group: u32,
        scale: f32,
        query_start: u32,
        page_start: u32,
        window: u32, // u32::MAX: none
        #[comptime] dk: usize,
        #[comptime] dv: usize,
        #[comptime] has_sinks: bool,
        #[comptime] first: bool,
        #[comptime] last: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let h = CUBE_POS_Y as usize;
        let t = CUBE_POS_X as usize * comptime!(QUERIES) + UNIT_POS_X as usize;
        let heads = q.shape(0);
        let tokens = q.shape(1);
        if t < tokens {
            let kv = h / group as usize;
            let n = keys.shape(1);
            let row = (t * heads + h) * dv;
            let state = (t * heads + h) * 2;

            // The running maximum and sum; a sink column starts them as its own softmax term.
            let mut top = F::min_value();
            let mut total = F::new(0.0);
            // Head sizes up to `UNROLLED` run with the query and the sums in registers.
            let mut acc = Array::<F>::new(dv);
            if first {
                if has_sinks {
                    top = sinks[h * sinks.stride(0)];
                    total = F::new(1.0);
                }
                #[unroll(dv <= UNROLLED)]
                for i in 0..dv {
                    acc[i] = F::new(0.0);
                }
            } else {
                top = stats[state];
                total = stats[state + 1];
                #[unroll(dv <= UNROLLED)]
                for i in 0..dv {
                    acc[i] = out[row + i];
                }
            }
            let q_base = h * q.stride(0) + t * q.stride(1);
            let mut query = Array::<F>::new(dk);
            #[unroll(dk <= UNROLLED)]
            for i in 0..dk {
                query[i] = q[q_base + i * q.stride(2)] * F::cast_from(scale);
            }

            // The keys this query sees on this page, as positions [lo, hi).
            let pos = query_start as usize + t;
            let start = page_start as usize;
            let mut lo = start;
            if pos + 1 > window as usize {
                lo = max(lo, pos + 1 - window as usize);
            }
            let hi = min(pos + 1, start + n);

            // Keys and values have unit stride along their last axis (checked by the launcher).
            let k_base = kv * keys.stride(0);
            let v_base = kv * values.stride(0);
            for key in lo..hi {
                let j = key - start;
                let k_row = k_base + j * keys.stride(1);
                let mut s = F::new(0.0);
                #[unroll(dk <= UNROLLED)]
                for i in 0..dk {
                    s += query[i] * keys[k_row + i];
                }
                let new_top = max(top, s);
                let rescale = F::exp(top - new_top);
                let p = F::exp(s - new_top);
                total = total * rescale + p;
                top = new_top;
                let v_row = v_base + j * values.stride(1);
                #[unroll(dv <= UNROLLED)]
                for i in 0..dv {
                    acc[i] = acc[i] * rescale + p * values[v_row + i];
                }
            }

            if last {
                #[unroll(dv <= UNROLLED)]
                for i in 0..dv {
                    out[row + i] = acc[i] / total;
                }
            } else {
                #[unroll(dv <= UNROLLED)]
                for i in 0..dv {
                    out[row + i] = acc[i];
                }
                stats[state] = top;
                stats[state + 1] = total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::{BLOCK, Page, Visibility, flash_attention, reference};
    use crate::testing::{device, max_diff, random};

    /// `[tokens, heads, dv]` from the kernel over `keys`/`values` `[kv_heads, n, d]` split into
    /// pages of `page` positions (the first starting at `key_start`).
    #[allow(clippy::too_many_arguments)]
    fn run(
        q: &Tensor<3>,
        keys: &Tensor<3>,
        values: &Tensor<3>,
        sinks: Option<&Tensor<3>>,
        key_start: usize,
        page: usize,
        visibility: Visibility,
    ) -> Vec<f32> {
        let [kv_heads, n, dk] = keys.dims();
        let dv = values.dims()[2];
        let mut bounds = vec![0];
        // Page boundaries at absolute multiples of `page`.
        let mut next = (key_start / page + 1) * page;
        while next < key_start + n {
            bounds.push(next - key_start);
            next += page;
        }
        bounds.push(n);
        let parts: Vec<(Tensor<3>, Tensor<3>, usize)> = bounds
            .windows(2)
            .map(|w| {
                (
                    keys.clone().slice([0..kv_heads, w[0]..w[1], 0..dk]),
                    values.clone().slice([0..kv_heads, w[0]..w[1], 0..dv]),
                    key_start + w[0],
                )
            })
            .collect();
        let pages: Vec<Page> = parts.iter().map(|(k, v, s)| Page { keys: k, values: v, start: *s }).collect();
        let out = flash_attention(q, &pages, sinks, 0.3, visibility).expect("CubeCL backend");
        out.into_data().try_to_vec().unwrap()
    }

    /// Odd lengths (not multiples of the block), grouped heads, windows shorter than a block and
    /// longer, a sink column, a pass after cached positions and keys that start mid-sequence (a
    /// windowed layer's pages): the kernel equals the definition, and splitting the cache into
    /// pages of one block, or into pages of several, changes no bit.
    #[test]
    fn flash_attention_matches_the_definition_and_pages_change_no_bit() {
        let device = &device();
        let (heads, kv_heads, dk, dv) = (4, 2, 12, 70);
        for (tokens, key_start, n, window, sinks) in [
            (5, 0, 5, None, false),
            (130, 0, 130, None, true),
            (40, 0, 171, None, false),
            (97, 0, 97, Some(5), true),
            (9, 60, 140, Some(100), false),
            (1, 0, 200, None, true),
            (3, 0, 67, Some(70), false),
        ] {
            let query_start = key_start + n - tokens;
            let visibility = Visibility { query_start, window };
            let qs = random(heads * tokens * dk, 1, 2.0);
            let (ks, vs) = (random(kv_heads * n * dk, 2, 2.0), random(kv_heads * n * dv, 3, 2.0));
            let ss = random(heads, 4, 2.0);
            let q = Tensor::<3>::from_data(TensorData::new(qs.clone(), [heads, tokens, dk]), device);
            let keys = Tensor::<3>::from_data(TensorData::new(ks.clone(), [kv_heads, n, dk]), device);
            let values = Tensor::<3>::from_data(TensorData::new(vs.clone(), [kv_heads, n, dv]), device);
            let sink = sinks.then(|| Tensor::<3>::from_data(TensorData::new(ss.clone(), [heads, 1, 1]), device));
            let whole = run(&q, &keys, &values, sink.as_ref(), key_start, 1 << 20, visibility);
            let shape = [heads, kv_heads, tokens, n, dk, dv];
            let want = reference(&qs, &ks, &vs, sinks.then_some(&ss[..]), shape, key_start, 0.3, visibility);
            let diff = max_diff(&whole, &want);
            let case = format!("{tokens} queries from {query_start}, keys {key_start}+{n}, window {window:?}");
            assert!(diff < 2e-5, "{case}: max diff {diff}");
            for page in [37, BLOCK, 3 * BLOCK] {
                let paged = run(&q, &keys, &values, sink.as_ref(), key_start, page, visibility);
                assert!(paged == whole, "{case}: pages of {page} positions changed the result");
            }
        }
    }

    /// A decode step (one query at position p) gives the same bits as row p of a prefill.
    #[test]
    fn one_query_equals_its_row_of_a_pass() {
        let device = &device();
        let (heads, kv_heads, dk, dv, n) = (2, 1, 8, 8, 150);
        let q = Tensor::<3>::from_data(TensorData::new(random(heads * n * dk, 5, 2.0), [heads, n, dk]), device);
        let keys =
            Tensor::<3>::from_data(TensorData::new(random(kv_heads * n * dk, 6, 2.0), [kv_heads, n, dk]), device);
        let values =
            Tensor::<3>::from_data(TensorData::new(random(kv_heads * n * dv, 7, 2.0), [kv_heads, n, dv]), device);
        let all = run(&q, &keys, &values, None, 0, BLOCK, Visibility { query_start: 0, window: None });
        for p in [0, 63, 64, 149] {
            let one = q.clone().slice([0..heads, p..p + 1, 0..dk]);
            let upto = |t: &Tensor<3>, d| t.clone().slice([0..kv_heads, 0..p + 1, 0..d]);
            let got = run(
                &one,
                &upto(&keys, dk),
                &upto(&values, dv),
                None,
                0,
                1 << 20,
                Visibility { query_start: p, window: None },
            );
            assert!(got[..] == all[p * heads * dv..(p + 1) * heads * dv], "position {p}");
        }
    }
}
