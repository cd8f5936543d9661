//! The host expert kernel (`--miss-policy cpu|auto`): SwiGLU for a handful of tokens over an
//! expert read where it lies in host memory (the memory map for float checkpoints, the host
//! copy for quantised formats), multithreaded over output rows.
//!
//! At decode one token needs one matrix-vector product per expert, so computing a missed
//! expert here reads its bytes once from host RAM, where uploading it moves the same bytes over
//! the link and then reads them again on the GPU. Each weight row is decoded once into f32 (a
//! no-op for f32) and dotted with every token; dot products run in `LANES` partial sums that the
//! compiler maps onto SIMD registers. The result differs from the GPU kernel's only by float
//! rounding (another summation order); `reference` is the plain version the tests hold it to.

use half::f16;
use rayon::prelude::*;

use crate::gemm::{Mat, gemm};

use ferry_shaders::format::{GROUP, QuantMatrix, e2m1_twice, get_code};

/// Partial sums per dot product: two 128-bit or one 256-bit register of f32.
const LANES: usize = 8;
/// Output rows one task decodes and computes: enough work per task that rayon's overhead stays
/// small, few enough that a decode step's matrices spread over every core.
const ROWS_PER_TASK: usize = 32;
/// Tokens from which a task's rows meet its tokens in one matrix product (matrixmultiply's
/// sgemm, register-tiled, AVX/FMA chosen at run time) instead of dot products: a prompt's batch
/// is compute-bound, a few decode tokens are memory-bound and keep `dot`'s sums.
const GEMM_TOKENS: usize = 8;

/// One matrix `[n, k]` as the host reads it: row `r` is output `r`'s weights over the reduction.
#[derive(Clone, Copy)]
pub enum HostMatrix<'a> {
    /// f32 rows (a mapped f32 checkpoint or a converted copy).
    F32(&'a [f32]),
    /// f32 rows rounded to f16 as they are read (what f16 slots hold).
    F32AsF16(&'a [f32]),
    /// bf16 rows (a mapped BF16 checkpoint, or bf16 slots' words).
    Bf16(&'a [u16]),
    /// f16 rows (a mapped F16 checkpoint).
    F16(&'a [u16]),
    /// Slot layout: codes packed along the reduction, columns are the outputs (see
    /// `ferry_shaders::format`).
    Quant { matrix: &'a QuantMatrix, bits: u32, fp4: bool },
}

impl HostMatrix<'_> {
    /// Rows to decode at once out of a task's `rows`: one for float formats, so that the
    /// converted row stays in L1 while every token reads it; the whole block for packed codes,
    /// whose neighbouring outputs share cache lines.
    fn rows_at_once(&self, rows: usize) -> usize {
        if matches!(self, Self::Quant { .. }) { rows } else { 1 }
    }

    /// Writes rows `first..first + count` (each `k` long) into `buf` as f32 and returns them;
    /// f32 rows are returned in place.
    fn rows<'s>(&'s self, n: usize, k: usize, first: usize, count: usize, buf: &'s mut Vec<f32>) -> &'s [f32] {
        let span = first * k..(first + count) * k;
        buf.resize(count * k, 0.0);
        match *self {
            Self::F32(w) => return &w[span],
            Self::F32AsF16(w) => buf.iter_mut().zip(&w[span]).for_each(|(o, &v)| *o = f16::from_f32(v).to_f32()),
            Self::Bf16(w) => buf.iter_mut().zip(&w[span]).for_each(|(o, &v)| *o = f32::from_bits(u32::from(v) << 16)),
            Self::F16(w) => buf.iter_mut().zip(&w[span]).for_each(|(o, &v)| *o = f16::from_bits(v).to_f32()),
            Self::Quant { matrix, bits, fp4 } => decode_columns(matrix, n, k, bits, fp4, first, count, buf),
        }
        buf
    }
}

/// Decodes columns `first..first + count` of a slot-layout matrix into rows of `buf`. Words of
/// neighbouring columns are neighbours in memory, so the block is read a cache line at a time.
#[allow(clippy::too_many_arguments)] // a matrix, its shape and format, and a block of it
fn decode_columns(
    m: &QuantMatrix,
    n: usize,
    k: usize,
    bits: u32,
    fp4: bool,
    first: usize,
    count: usize,
    buf: &mut [f32],
) {
    let zero = 1i32 << (bits - 1);
    let value = |code: u32| if fp4 { e2m1_twice(code) as f32 } else { (code as i32 - zero) as f32 };
    if bits == 3 {
        // Bit planes: codes straddle words; the general reader is simple and rare enough.
        for c in 0..count {
            for r in 0..k {
                buf[c * k + r] = value(get_code(&m.words, n, first + c, r, 3)) * m.scales[r / GROUP * n + first + c];
            }
        }
        return;
    }
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    for row in 0..k / per_word {
        let words = &m.words[row * n + first..][..count];
        let r0 = row * per_word;
        let scales = &m.scales[r0 / GROUP * n + first..][..count];
        for (c, (&word, &scale)) in words.iter().zip(scales).enumerate() {
            for p in 0..per_word {
                buf[c * k + r0 + p] = value((word >> (p as u32 * bits)) & mask) * scale;
            }
        }
    }
}

/// `a . b` in `LANES` partial sums, added pairwise at the end.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    add_lanes(acc) + a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum::<f32>()
}

/// The partial sums added pairwise, halving the width each step.
fn add_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// `dot(a, b)` for four `b`s at once, bit for bit: the same partial sums in the same order.
fn dot4(a: &[f32], bs: &[&[f32]; 4]) -> [f32; 4] {
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let b_chunks = bs.map(|b| b.as_chunks::<LANES>().0);
    let mut acc = [[0f32; LANES]; 4];
    for (i, x) in a_chunks.iter().enumerate() {
        for (acc, b) in acc.iter_mut().zip(&b_chunks) {
            let y = &b[i];
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
    }
    let at = a_chunks.len() * LANES;
    std::array::from_fn(|j| add_lanes(acc[j]) + a_tail.iter().zip(&bs[j][at..]).map(|(x, y)| x * y).sum::<f32>())
}

/// GPT-OSS's additions to plain SwiGLU, as host values: gate then up biases `[2 * inter]` and
/// down biases `[hidden]` of one expert, and the clamp `(limit, alpha)`.
#[derive(Clone, Copy, Default)]
pub struct HostExtras<'a> {
    pub bias: Option<(&'a [f32], &'a [f32])>,
    pub clamp: Option<(f32, f32)>,
}

/// A layer's GPT-OSS additions on the host: biases of every expert (gate then up
/// `[experts, 2 * inter]`, down `[experts, hidden]`) and the clamp.
#[derive(Debug, Clone, Default)]
pub struct LayerExtras {
    pub bias: Option<(Vec<f32>, Vec<f32>)>,
    pub clamp: Option<(f32, f32)>,
}

impl LayerExtras {
    /// Expert `e`'s share.
    pub fn expert(&self, e: usize, inter: usize, hidden: usize) -> HostExtras<'_> {
        HostExtras {
            bias: self.bias.as_ref().map(|(gu, d)| (&gu[e * 2 * inter..][..2 * inter], &d[e * hidden..][..hidden])),
            clamp: self.clamp,
        }
    }
}

/// One expert's three matrices: gate and up `[inter, hidden]`, down `[hidden, inter]`.
#[derive(Clone, Copy)]
pub struct HostExpertView<'a> {
    pub gate: HostMatrix<'a>,
    pub up: HostMatrix<'a>,
    pub down: HostMatrix<'a>,
}

/// For each token `xs[t]` (`hidden` long), `weights[t] * expert(xs[t])` into `out[t]`
/// (`hidden` long), computed on the calling rayon pool.
pub fn swiglu(
    expert: HostExpertView<'_>,
    hidden: usize,
    inter: usize,
    xs: &[&[f32]],
    weights: &[f32],
    extras: HostExtras<'_>,
    out: &mut [Vec<f32>],
) {
    let tokens = xs.len();
    let (gate, up) = (project(expert.gate, inter, hidden, xs), project(expert.up, inter, hidden, xs));
    let act: Vec<Vec<f32>> = (0..tokens)
        .map(|t| (0..inter).map(|i| activate(gate[i * tokens + t], up[i * tokens + t], i, inter, extras)).collect())
        .collect();
    let act: Vec<&[f32]> = act.iter().map(Vec::as_slice).collect();
    let down = project(expert.down, hidden, inter, &act);
    for (t, row) in out.iter_mut().enumerate() {
        row.clear();
        row.extend((0..hidden).map(|h| {
            let bias = extras.bias.map_or(0.0, |(_, d)| d[h]);
            weights[t] * (down[h * tokens + t] + bias)
        }));
    }
}

/// `matrix` `[n, k]` times each of `vs` (`k` long): `[n, vs.len()]`, output-major, in parallel
/// over blocks of `ROWS_PER_TASK` outputs.
fn project(matrix: HostMatrix<'_>, n: usize, k: usize, vs: &[&[f32]]) -> Vec<f32> {
    let tokens = vs.len();
    let mut out = vec![0f32; n * tokens];
    // A prompt's tokens, packed `[tokens, k]` for the matrix product.
    let packed: Option<Vec<f32>> =
        (tokens >= GEMM_TOKENS).then(|| vs.iter().flat_map(|v| v[..k].iter().copied()).collect());
    out.par_chunks_mut(ROWS_PER_TASK * tokens).enumerate().for_each(|(b, block)| {
        let first = b * ROWS_PER_TASK;
        let rows = block.len() / tokens;
        let mut buf = Vec::new();
        if let Some(x) = &packed {
            let weights = matrix.rows(n, k, first, rows, &mut buf);
            // block[r * tokens + t] = weights[r] . x[t].
            gemm(Mat::rows(weights, rows, k), Mat::transposed(x, tokens, k), block);
            return;
        }
        let step = matrix.rows_at_once(rows);
        for sub in (0..rows).step_by(step) {
            let count = step.min(rows - sub);
            let weights = matrix.rows(n, k, first + sub, count, &mut buf);
            for r in 0..count {
                let row = &weights[r * k..][..k];
                let outs = &mut block[(sub + r) * tokens..][..tokens];
                // Four tokens per pass over the row: each chunk of it is loaded once for four
                // dot products (a prompt's many tokens make this compute-bound), each summed
                // exactly as `dot` sums it.
                let (quads, rest) = vs.as_chunks::<4>();
                for (q, four) in quads.iter().enumerate() {
                    outs[4 * q..][..4].copy_from_slice(&dot4(row, four));
                }
                for (t, v) in rest.iter().enumerate() {
                    outs[4 * quads.len() + t] = dot(row, v);
                }
            }
        }
    });
    out
}

/// The activation between gate/up and down, as the GPU kernels compute it.
fn activate(g: f32, u: f32, i: usize, inter: usize, extras: HostExtras<'_>) -> f32 {
    let (mut g, mut u) = (g, u);
    if let Some((gate_up, _)) = extras.bias {
        g += gate_up[i];
        u += gate_up[inter + i];
    }
    match extras.clamp {
        None => g / (1.0 + (-g).exp()) * u,
        Some((limit, alpha)) => {
            let g = g.min(limit);
            let u = u.clamp(-limit, limit);
            (u + 1.0) * (g / (1.0 + (-alpha * g).exp()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_shaders::expert::{pack_bf16, reference, unpack_bf16};
    use ferry_shaders::format::{dequantize, quantize, quantize_mxfp4};

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}: element {i}: {x} vs {y}");
        }
    }

    /// Runs the host kernel for three tokens with distinct routing weights and checks each
    /// row against the reference on the weights the matrices stand for.
    fn check(
        view: HostExpertView<'_>,
        f32s: [&[f32]; 3],
        hidden: usize,
        inter: usize,
        extras: HostExtras<'_>,
        what: &str,
    ) {
        let xs: Vec<Vec<f32>> = (0..3).map(|t| random(hidden, 100 + t)).collect();
        let x_refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let weights = [0.5, 1.0, 0.25];
        let mut out = vec![Vec::new(); 3];
        swiglu(view, hidden, inter, &x_refs, &weights, extras, &mut out);
        let gpt = extras.bias.zip(extras.clamp).map(|((gu, d), (limit, _))| (gu, d, limit, 1.702));
        for t in 0..3 {
            let want: Vec<f32> = reference(f32s, &xs[t], gpt).iter().map(|v| v * weights[t]).collect();
            close(&out[t], &want, &format!("{what}, token {t}"));
        }
    }

    /// Four tokens per pass over a row give each token's `dot` bit for bit, at lengths with and
    /// without a tail; a prompt's token count then changes no token's result.
    #[test]
    fn four_tokens_per_pass_sum_as_one_does() {
        for k in [1, 7, 8, 37, 64, 203] {
            let a = random(k, 9);
            let bs: Vec<Vec<f32>> = (0..4).map(|j| random(k, 10 + j)).collect();
            let four = [&bs[0][..], &bs[1], &bs[2], &bs[3]];
            let got = dot4(&a, &four);
            for j in 0..4 {
                assert_eq!(got[j].to_bits(), dot(&a, &bs[j]).to_bits(), "k {k}, token {j}");
            }
        }
        // Through `project`: 1, 4 and 6 tokens give every token the same bits.
        let (n, k) = (40, 72);
        let m = random(n * k, 20);
        let vs: Vec<Vec<f32>> = (0..6).map(|t| random(k, 30 + t)).collect();
        let refs: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
        let six = project(HostMatrix::F32(&m), n, k, &refs);
        for t in 0..6 {
            let one = project(HostMatrix::F32(&m), n, k, &refs[t..t + 1]);
            let four = project(HostMatrix::F32(&m), n, k, &refs[t.min(2)..t.min(2) + 4]);
            for r in 0..n {
                assert_eq!(six[r * 6 + t].to_bits(), one[r].to_bits(), "row {r}, token {t} of 6 against alone");
                assert_eq!(six[r * 6 + t].to_bits(), four[r * 4 + t - t.min(2)].to_bits(), "row {r}, token {t}");
            }
        }
    }

    /// A prompt-sized batch goes through the matrix product: each token's outputs stay within
    /// float rounding of its dot products, for float rows and decoded quantised ones.
    #[test]
    fn prompt_sized_batches_match_the_dot_products() {
        let (n, k, tokens) = (70, 96, 11);
        let m = random(n * k, 40);
        let vs: Vec<Vec<f32>> = (0..tokens).map(|t| random(k, 50 + t as u32)).collect();
        let refs: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
        let q = quantize(&m, n, k, 8);
        for (matrix, what) in
            [(HostMatrix::F32(&m), "f32"), (HostMatrix::Quant { matrix: &q, bits: 8, fp4: false }, "int8")]
        {
            let batch = project(matrix, n, k, &refs);
            for (t, v) in refs.iter().enumerate() {
                let alone = project(matrix, n, k, &[v]);
                for r in 0..n {
                    let (got, want) = (batch[r * tokens + t], alone[r]);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{what} row {r} token {t}: {got} against {want}"
                    );
                }
            }
        }
    }

    /// Sizes that are not multiples of the lanes nor of the rows per task.
    #[test]
    fn float_formats_match_the_reference() {
        let (hidden, inter) = (72, 40);
        let w = [random(inter * hidden, 1), random(inter * hidden, 2), random(hidden * inter, 3)];
        let view = |half: bool| {
            let [gate, up, down] =
                w.each_ref().map(|m| if half { HostMatrix::F32AsF16(m) } else { HostMatrix::F32(m) });
            HostExpertView { gate, up, down }
        };
        let plain = [&w[0][..], &w[1], &w[2]];
        check(view(false), plain, hidden, inter, HostExtras::default(), "f32");

        let halves: Vec<Vec<u16>> = w.iter().map(|m| m.iter().map(|&v| f16::from_f32(v).to_bits()).collect()).collect();
        let rounded: Vec<Vec<f32>> =
            halves.iter().map(|m| m.iter().map(|&h| f16::from_bits(h).to_f32()).collect()).collect();
        let exact = [&rounded[0][..], &rounded[1], &rounded[2]];
        let f16s = HostExpertView {
            gate: HostMatrix::F16(&halves[0]),
            up: HostMatrix::F16(&halves[1]),
            down: HostMatrix::F16(&halves[2]),
        };
        check(f16s, exact, hidden, inter, HostExtras::default(), "f16");
        check(view(true), exact, hidden, inter, HostExtras::default(), "f32 as f16");

        let words: Vec<Vec<u32>> = w.iter().map(|m| pack_bf16(m)).collect();
        let bf16s: Vec<&[u16]> = words.iter().map(|m| bytemuck::cast_slice(m)).collect();
        let unpacked: Vec<Vec<f32>> = words.iter().map(|m| unpack_bf16(m)).collect();
        let view = HostExpertView {
            gate: HostMatrix::Bf16(bf16s[0]),
            up: HostMatrix::Bf16(bf16s[1]),
            down: HostMatrix::Bf16(bf16s[2]),
        };
        check(view, [&unpacked[0], &unpacked[1], &unpacked[2]], hidden, inter, HostExtras::default(), "bf16");
    }

    #[test]
    fn quantised_formats_match_the_reference_on_dequantised_weights() {
        let (hidden, inter) = (64, 96);
        let w = [random(inter * hidden, 4), random(inter * hidden, 5), random(hidden * inter, 6)];
        for (bits, fp4) in [(8, false), (4, false), (3, false), (2, false), (4, true)] {
            let q = |m: &[f32], n: usize, k: usize| if fp4 { quantize_mxfp4(m, n, k) } else { quantize(m, n, k, bits) };
            let ms = [q(&w[0], inter, hidden), q(&w[1], inter, hidden), q(&w[2], hidden, inter)];
            let back = [
                dequantize(&ms[0], inter, hidden, bits, fp4),
                dequantize(&ms[1], inter, hidden, bits, fp4),
                dequantize(&ms[2], hidden, inter, bits, fp4),
            ];
            let m = |i: usize| HostMatrix::Quant { matrix: &ms[i], bits, fp4 };
            let view = HostExpertView { gate: m(0), up: m(1), down: m(2) };
            check(
                view,
                [&back[0], &back[1], &back[2]],
                hidden,
                inter,
                HostExtras::default(),
                &format!("{bits} bits, fp4 {fp4}"),
            );
        }
    }

    #[test]
    fn gpt_oss_biases_and_clamp_match_the_reference() {
        let (hidden, inter) = (48, 32);
        let w = [random(inter * hidden, 7), random(inter * hidden, 8), random(hidden * inter, 9)];
        // Large enough that the clamp at 1.5 cuts a share of the gate and up values.
        let w: Vec<Vec<f32>> = w.iter().map(|m| m.iter().map(|v| v * 3.0).collect()).collect();
        let (gate_up, down) = (random(2 * inter, 10), random(hidden, 11));
        let extras = HostExtras { bias: Some((&gate_up, &down)), clamp: Some((1.5, 1.702)) };
        let view =
            HostExpertView { gate: HostMatrix::F32(&w[0]), up: HostMatrix::F32(&w[1]), down: HostMatrix::F32(&w[2]) };
        check(view, [&w[0], &w[1], &w[2]], hidden, inter, extras, "gpt-oss");
    }
}
