//! The grouped expert FFN: every selected expert of every token of one layer in one pair of
//! kernel launches (gate/up, then down) per slot page, reading the experts' weights straight
//! out of their slots — no per-expert ops, no copies of the weights.
//!
//! Exactness: each assignment (token, expert) writes its own output row, and every dot product
//! runs in index order, so a token's result does not depend on which slot or page its experts
//! sit in, nor on which other tokens share the launch. Offloaded output therefore equals
//! all-resident output bit for bit.

mod bf16;
mod common;
mod float;
mod packed;

pub use bf16::{Bf16Page, pack_bf16, unpack_bf16};
pub use common::{DeviceWork, ExpertExtras, PageWork, Work};
pub use float::FloatPage;
pub use packed::PackedPage;

/// Plain SwiGLU on the host for one expert in checkpoint layout (gate, up `[inter, hidden]`,
/// down `[hidden, inter]`), or with `clamp` = `(limit, alpha)` and the expert's biases
/// (`gate_up` `[2 * inter]` gate first, `down` `[hidden]`) GPT-OSS's clamped SwiGLU.
pub fn reference([gate, up, down]: [&[f32]; 3], x: &[f32], extras: Option<(&[f32], &[f32], f32, f32)>) -> Vec<f32> {
    let (hidden, inter) = (x.len(), gate.len() / x.len());
    let dot = |w: &[f32], row: usize, v: &[f32], n: usize| (0..n).map(|j| w[row * n + j] * v[j]).sum::<f32>();
    let act: Vec<f32> = (0..inter)
        .map(|i| {
            let (g, u) = (dot(gate, i, x, hidden), dot(up, i, x, hidden));
            match extras {
                None => g / (1.0 + (-g).exp()) * u,
                Some((gate_up, _, limit, alpha)) => {
                    let g = (g + gate_up[i]).min(limit);
                    let u = (u + gate_up[inter + i]).clamp(-limit, limit);
                    (u + 1.0) * (g / (1.0 + (-alpha * g).exp()))
                }
            }
        })
        .collect();
    (0..hidden).map(|h| dot(down, h, &act, inter) + extras.map_or(0.0, |(_, down, _, _)| down[h])).collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::{Bf16Page, ExpertExtras, FloatPage, PackedPage, PageWork, pack_bf16, unpack_bf16};
    use crate::bridge::{cube_float, from_cube};
    use crate::format::{QuantMatrix, dequantize, quantize, quantize_mxfp4};
    use crate::split::Split;
    use crate::testing::{device, random};

    /// The splits every format is checked under: whole dot products (a CPU adapter's), and
    /// chunks of 2 to 8 inputs in up to 8 ways (a GPU's shape at the tests' small sizes).
    fn splits() -> [Split; 3] {
        [Split::WHOLE, Split::fine(8, 2), Split::fine(4, 8)]
    }

    /// A slot format under test: float (f16 or not), or packed codes of `bits` (e2m1 with fp4).
    #[derive(Debug, Clone, Copy)]
    enum Format {
        Float {
            half: bool,
        },
        /// Float slots with each projection split by output rows into `parts` buffers.
        Split {
            half: bool,
            parts: usize,
        },
        Bf16,
        /// f32 slots holding bf16-rounded values (what `Bf16` must compute bit for bit).
        Bf16AsF32,
        Packed {
            bits: u32,
            fp4: bool,
        },
    }

    const INT8: Format = Format::Packed { bits: 8, fp4: false };
    const INT4: Format = Format::Packed { bits: 4, fp4: false };
    const INT3: Format = Format::Packed { bits: 3, fp4: false };
    const INT2: Format = Format::Packed { bits: 2, fp4: false };
    const MXFP4: Format = Format::Packed { bits: 4, fp4: true };
    const F32: Format = Format::Float { half: false };
    const F16: Format = Format::Float { half: true };
    const BF16: Format = Format::Bf16;

    /// GPT-OSS's extras for the reference: gate then up biases, down biases, clamp limit.
    struct Extras {
        gate_up: Vec<f32>,
        down: Vec<f32>,
        limit: f32,
    }

    /// Imbalanced routing (one expert serves every token), experts serving nobody, a token with
    /// a single expert (a little token), and experts spread over three pages: the kernel's rows
    /// match a CPU reference, and rows nobody was routed to stay zero.
    #[test]
    fn grouped_swiglu_matches_a_cpu_reference_across_pages_and_odd_routing() {
        for split in splits() {
            check_against_reference(F32, 24, 40, false, split);
            check_against_reference(F16, 24, 40, false, split);
            let bf16 = check_against_reference(BF16, 24, 40, false, split);
            // Sizes that do not divide by four: one row per unit instead of four.
            check_against_reference(F32, 26, 42, false, split);
            check_against_reference(F32, 26, 42, true, split);
            check_against_reference(BF16, 26, 42, true, split);
            // bf16 words compute what f32 slots holding the same values compute, bit for bit.
            assert!(bf16 == check_against_reference(Format::Bf16AsF32, 24, 40, false, split), "{split:?}");
        }
    }

    /// The same routing over int8, int4, int3, int2 and MXFP4 slots: the kernel equals a CPU reference run
    /// on the weights the codes stand for.
    #[test]
    fn quantised_grouped_swiglu_matches_a_cpu_reference_on_dequantised_weights() {
        for split in [Split::WHOLE, Split::fine(4, 32)] {
            check_against_reference(INT8, 64, 32, false, split);
            check_against_reference(INT4, 32, 64, false, split);
            check_against_reference(MXFP4, 32, 64, false, split);
            check_against_reference(INT2, 64, 32, false, split);
            check_against_reference(INT3, 64, 96, false, split);
        }
    }

    /// Each projection split by output rows into 2 or 4 buffers (what an expert larger than a
    /// binding gets): the same bits as one buffer, with and without GPT-OSS's biases and clamp.
    #[test]
    fn split_projections_compute_the_same_bits() {
        for ways in splits() {
            for gpt_oss in [false, true] {
                for half in [false, true] {
                    let whole = check_against_reference(Format::Float { half }, 24, 40, gpt_oss, ways);
                    for parts in [2, 4] {
                        let split = check_against_reference(Format::Split { half, parts }, 24, 40, gpt_oss, ways);
                        assert!(split == whole, "{parts} parts, half {half}, gpt-oss {gpt_oss}, {ways:?}");
                    }
                }
            }
        }
    }

    /// GPT-OSS's experts (per-expert biases, clamped SwiGLU) in every slot format.
    #[test]
    fn biased_clamped_experts_match_a_cpu_reference_in_every_format() {
        for split in [Split::WHOLE, Split::fine(4, 32)] {
            for format in [F32, F16, BF16, INT8, INT4, INT3, INT2, MXFP4] {
                check_against_reference(format, 64, 32, true, split);
            }
        }
    }

    /// A page of either kind.
    enum Page {
        Float(Box<FloatPage>),
        Bf16(Box<Bf16Page>),
        Packed(Box<PackedPage>),
    }

    /// An expert's f32 weights (what the reference runs on) and, packed, its codes.
    type Stored = ([Vec<f32>; 3], Option<[QuantMatrix; 3]>);

    /// Runs the routing below over `format` pages, checks every row against the reference, and
    /// returns the rows.
    fn check_against_reference(format: Format, hidden: usize, inter: usize, gpt_oss: bool, split: Split) -> Vec<f32> {
        let device = &device();
        let (tokens, k) = (5, 2);
        let weights: Vec<[Vec<f32>; 3]> = (0..5u64)
            .map(|e| {
                let r = |i: u64, n: usize| random(n, 7 + 3 * e + i, 1.0);
                [r(0, inter * hidden), r(1, inter * hidden), r(2, hidden * inter)]
            })
            .collect();
        let x = random(tokens * hidden, 99, 1.0);
        // What is uploaded, and the f32 weights it stands for (the reference's).
        let packed = |w: &[f32], n: usize, kk: usize| -> QuantMatrix {
            match format {
                Format::Packed { fp4: true, .. } => quantize_mxfp4(w, n, kk),
                Format::Packed { bits, .. } => quantize(w, n, kk, bits),
                Format::Float { .. } | Format::Split { .. } | Format::Bf16 | Format::Bf16AsF32 => {
                    unreachable!("float formats are not packed")
                }
            }
        };
        let experts: Vec<Stored> = weights
            .iter()
            .map(|w| match format {
                // f16 slots hold the weights rounded to half precision.
                Format::Float { half: true } | Format::Split { half: true, .. } => {
                    (w.clone().map(|v| v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect()), None)
                }
                Format::Float { half: false } | Format::Split { half: false, .. } => (w.clone(), None),
                // bf16 slots hold the weights rounded to bf16.
                Format::Bf16 | Format::Bf16AsF32 => (w.clone().map(|v| unpack_bf16(&pack_bf16(&v))), None),
                Format::Packed { bits, fp4 } => {
                    let q = [packed(&w[0], inter, hidden), packed(&w[1], inter, hidden), packed(&w[2], hidden, inter)];
                    let back = [
                        dequantize(&q[0], inter, hidden, bits, fp4),
                        dequantize(&q[1], inter, hidden, bits, fp4),
                        dequantize(&q[2], hidden, inter, bits, fp4),
                    ];
                    (back, Some(q))
                }
            })
            .collect();
        // Two slots per page: experts 0-1, 2-3 and 4 live in three pages.
        let like = cube_float(Tensor::<1>::zeros([1], device)).unwrap();
        let pages: Vec<Page> = [2, 2, 1]
            .into_iter()
            .map(|slots| match format {
                Format::Float { half } => Page::Float(Box::new(FloatPage::new(&like, slots, hidden, inter, half))),
                Format::Bf16AsF32 => Page::Float(Box::new(FloatPage::new(&like, slots, hidden, inter, false))),
                Format::Split { half, parts } => {
                    Page::Float(Box::new(FloatPage::split(&like, slots, hidden, inter, half, parts)))
                }
                Format::Bf16 => Page::Bf16(Box::new(Bf16Page::new(&like, slots, hidden, inter))),
                Format::Packed { bits, fp4 } => {
                    Page::Packed(Box::new(PackedPage::new(&like, slots, hidden, inter, bits, fp4)))
                }
            })
            .collect();
        for (e, (w, (stored, q))) in weights.iter().zip(&experts).enumerate() {
            match (&pages[e / 2], q) {
                (Page::Float(p), _) if matches!(format, Format::Bf16AsF32) => {
                    p.store(e % 2, stored.clone(), device).unwrap()
                }
                (Page::Float(p), _) => p.store(e % 2, w.clone(), device).unwrap(),
                (Page::Bf16(p), _) => {
                    let [g, u, d] = w.each_ref().map(|v| pack_bf16(v));
                    p.store(e % 2, [&g, &u, &d]).unwrap()
                }
                (Page::Packed(p), Some([g, u, d])) => p.store(e % 2, [g, u, d], device).unwrap(),
                (Page::Packed(_), None) => unreachable!("packed formats carry codes"),
            }
        }

        // (token, rank, expert, weight): expert 0 serves everyone; 1 and 3 nobody; token 4 is little.
        let routes = [(0, 0, 0, 0.6), (0, 1, 2, 0.4), (1, 0, 0, 0.5), (1, 1, 4, 0.5), (2, 0, 4, 0.7)];
        let routes = [&routes[..], &[(2, 1, 0, 0.3), (3, 0, 0, 1.0), (3, 1, 2, 0.25), (4, 0, 0, 1.0)]].concat();
        let xc = cube_float(Tensor::<2>::from_data(TensorData::new(x.clone(), [tokens, hidden]), device)).unwrap();
        // Large enough weights that the clamp at 1.5 cuts a good share of gate and up values.
        let reference_extras = gpt_oss.then(|| Extras {
            gate_up: (0..5 * 2 * inter).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect(),
            down: (0..5 * hidden).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect(),
            limit: 1.5,
        });
        let extras = match &reference_extras {
            None => ExpertExtras::new(None, None, split, device).unwrap(),
            Some(ex) => {
                ExpertExtras::new(Some((ex.gate_up.clone(), ex.down.clone())), Some((ex.limit, 1.702)), split, device)
                    .unwrap()
            }
        };
        let act = cube_float(Tensor::<2>::empty([tokens * k, inter], device)).unwrap();
        let y = cube_float(Tensor::<2>::zeros([tokens * k, hidden], device)).unwrap();
        for (p, page) in pages.iter().enumerate() {
            let mut work = PageWork::default();
            for e in (0..5).filter(|e| e / 2 == p) {
                let served = routes.iter().filter(|r| r.2 == e).map(|&(t, rank, _, w)| (t, t * k + rank, w));
                if served.clone().count() > 0 {
                    work.push(e % 2, e, served);
                }
            }
            match page {
                Page::Float(page) => page.swiglu(&xc, (&work).into(), &extras, &act, &y, device).unwrap(),
                Page::Bf16(page) => page.swiglu(&xc, (&work).into(), &extras, &act, &y, device).unwrap(),
                Page::Packed(page) => page.swiglu(&xc, (&work).into(), &extras, &act, &y, device).unwrap(),
            }
        }
        let got: Vec<f32> = from_cube::<2>(y).into_data().try_into_vec::<f32>().unwrap();
        // Quantised sums run group by group, so their rounding differs a little more.
        let exact =
            matches!(format, Format::Float { half: false } | Format::Split { half: false, .. } | Format::Bf16AsF32);
        let tolerance = if exact { 1e-5 } else { 1e-4 };
        for t in 0..tokens {
            for rank in 0..k {
                let row = &got[(t * k + rank) * hidden..][..hidden];
                match routes.iter().find(|r| r.0 == t && r.1 == rank) {
                    None => assert!(row.iter().all(|&v| v == 0.0), "{format:?}: token {t} rank {rank} was not routed"),
                    Some(&(_, _, e, w)) => {
                        let ex = reference_extras.as_ref().map(|ex| {
                            (
                                &ex.gate_up[e * 2 * inter..][..2 * inter],
                                &ex.down[e * hidden..][..hidden],
                                ex.limit,
                                1.702,
                            )
                        });
                        let [g, u, d] = &experts[e].0;
                        let want = super::reference([g, u, d], &x[t * hidden..][..hidden], ex);
                        for (g, r) in row.iter().zip(&want) {
                            assert!(
                                (g - r * w).abs() <= tolerance * (1.0 + r.abs()),
                                "{format:?}: token {t} expert {e}: {g} vs {}",
                                r * w
                            );
                        }
                    }
                }
            }
        }
        got
    }
}
