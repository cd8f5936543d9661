//! Group-wise quantised experts (`--expert-dtype int8|int4|int3|int2|mxfp4`): one scale per `GROUP` weights
//! along the dimension a dot product runs over (symmetric, absmax / qmax), codes packed into u32
//! words in the slot's own layout, dequantised inside the grouped expert kernel. Quantised
//! experts are smaller in host RAM, on the link and in their GPU slots; they are an
//! approximation, so `ferry eval` measures what they cost.

use crate::error::{FerryError, Result};

/// Weights sharing one scale, along the reduction dimension.
pub const GROUP: usize = 32;

/// How routed experts are stored in host RAM and in their GPU slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpertDtype {
    /// Exact: f32 as Ferry computes.
    #[default]
    F32,
    /// Half precision in the slots (loads in f16, sums in f32); needs `shader-f16`.
    F16,
    Int8,
    Int4,
    /// Symmetric 3-bit codes (-3..=3 times the group's scale), stored in bit planes.
    Int3,
    /// Symmetric 2-bit codes: each weight is -1, 0 or +1 times its group's scale.
    Int2,
    /// OCP MXFP4 as GPT-OSS ships it: e2m1 codes, one power-of-two scale per 32 weights. An
    /// MXFP4 checkpoint is uploaded as it is (exact); other checkpoints are rounded to it.
    Mxfp4,
}

impl std::str::FromStr for ExpertDtype {
    type Err = FerryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            "int3" => Ok(Self::Int3),
            "int2" => Ok(Self::Int2),
            "mxfp4" => Ok(Self::Mxfp4),
            other => Err(FerryError::flag(
                "--expert-dtype",
                format!("unknown dtype {other:?}; use f32, f16, int8, int4, int3, int2 or mxfp4"),
            )),
        }
    }
}

impl std::fmt::Display for ExpertDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Int3 => "int3",
            Self::Int2 => "int2",
            Self::Mxfp4 => "mxfp4",
        })
    }
}

impl ExpertDtype {
    /// Bits per quantised weight; None for the float formats (f32, f16).
    pub fn bits(self) -> Option<u32> {
        match self {
            Self::F32 | Self::F16 => None,
            Self::Int8 => Some(8),
            Self::Int4 | Self::Mxfp4 => Some(4),
            Self::Int3 => Some(3),
            Self::Int2 => Some(2),
        }
    }

    /// Bits per weight in a slot's largest buffer (codes for quantised formats).
    pub fn weight_bits(self) -> u32 {
        match self {
            Self::F32 => 32,
            Self::F16 => 16,
            other => other.bits().unwrap_or(32),
        }
    }

    /// Whether codes are e2m1 floating-point values (MXFP4) rather than offset integers.
    pub fn fp4(self) -> bool {
        self == Self::Mxfp4
    }

    /// Bytes of one expert (gate, up, down of `hidden x intermediate`) in this format.
    pub fn expert_bytes(self, hidden: usize, inter: usize) -> u64 {
        let weights = (3 * hidden * inter) as u64;
        match self.bits() {
            None => weights * u64::from(self.weight_bits()) / 8,
            Some(bits) => weights * u64::from(bits) / 8 + weights / GROUP as u64 * 4,
        }
    }

    /// Quantised formats need both expert dimensions to be whole groups.
    pub fn check(self, hidden: usize, inter: usize) -> Result<()> {
        if self.bits().is_some() && (!hidden.is_multiple_of(GROUP) || !inter.is_multiple_of(GROUP)) {
            return Err(FerryError::flag(
                "--expert-dtype",
                format!("{self} needs hidden ({hidden}) and expert intermediate ({inter}) sizes divisible by {GROUP}"),
            ));
        }
        Ok(())
    }
}

/// Rows of u32 code words for `k` reduction rows of `bits`-bit codes (`k` whole groups).
pub fn code_rows(k: usize, bits: u32) -> usize {
    k * bits as usize / 32
}

/// Code `r` of `column`. Widths that divide 32 pack whole codes, the first in the lowest bits.
/// 3-bit codes would straddle words, so each group of 32 is kept in bit planes: two words of
/// low 2-bit parts (16 codes each), then one word of the 32 high bits.
pub fn get_code(words: &[u32], n: usize, column: usize, r: usize, bits: u32) -> u32 {
    if bits == 3 {
        let (q, b) = (r / GROUP, r % GROUP);
        let low = (words[(q * 3 + b / 16) * n + column] >> (2 * (b % 16))) & 3;
        let high = (words[(q * 3 + 2) * n + column] >> b) & 1;
        return low | high << 2;
    }
    let per_word = (32 / bits) as usize;
    (words[r / per_word * n + column] >> ((r % per_word) as u32 * bits)) & ((1 << bits) - 1)
}

/// Ors `code` into its place (see `get_code`); the words start zeroed.
fn put_code(words: &mut [u32], n: usize, column: usize, r: usize, bits: u32, code: u32) {
    if bits == 3 {
        let (q, b) = (r / GROUP, r % GROUP);
        words[(q * 3 + b / 16) * n + column] |= (code & 3) << (2 * (b % 16));
        words[(q * 3 + 2) * n + column] |= (code >> 2) << b;
        return;
    }
    let per_word = (32 / bits) as usize;
    words[r / per_word * n + column] |= code << ((r % per_word) as u32 * bits);
}

/// One matrix in slot layout: `k` reduction rows by `n` columns, codes packed along `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// `[code_rows(k, bits), n]`, packed as `get_code` reads them. An integer code is the
    /// signed value plus `2^(bits-1)`; an MXFP4 code is an e2m1 nibble (see `e2m1_twice`).
    pub words: Vec<u32>,
    /// `[k / GROUP, n]`.
    pub scales: Vec<f32>,
}

/// Quantises `w`, given in checkpoint layout `[n, k]` (one row per output, over the reduction
/// dimension), into slot layout.
pub fn quantize(w: &[f32], n: usize, k: usize, bits: u32) -> QuantMatrix {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let zero = 1i32 << (bits - 1);
    let mut words = vec![0u32; code_rows(k, bits) * n];
    let mut scales = vec![0f32; k / GROUP * n];
    for (column, row) in w.chunks_exact(k).enumerate().take(n) {
        for (g, group) in row.chunks_exact(GROUP).enumerate() {
            let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / qmax } else { 1.0 };
            scales[g * n + column] = scale;
            for (offset, &v) in group.iter().enumerate() {
                let r = g * GROUP + offset;
                let code = ((v / scale).round().clamp(-qmax, qmax) as i32 + zero) as u32;
                put_code(&mut words, n, column, r, bits, code);
            }
        }
    }
    QuantMatrix { words, scales }
}

/// Twice the value of an e2m1 code (sign bit 3, exponent bits 2-1, mantissa bit 0), an
/// integer: the kernel decodes the same way and MXFP4 slot scales carry the factor 1/2.
pub fn e2m1_twice(code: u32) -> i32 {
    let (e, m) = ((code >> 1) & 3, (code & 1) as i32);
    let magnitude = if e == 0 { m } else { (2 + m) << (e - 1) };
    if code & 8 != 0 { -magnitude } else { magnitude }
}

/// `2^exponent` as f32, subnormals included (MXFP4 scales reach 2^-128).
pub fn pow2(exponent: i32) -> f32 {
    match exponent {
        e if e >= -126 => f32::from_bits(((e + 127).min(254) as u32) << 23),
        e if e >= -149 => f32::from_bits(1 << (e + 149)),
        _ => 0.0,
    }
}

/// Rounds `w` (checkpoint layout `[n, k]`) to MXFP4 in slot layout: per group the smallest
/// power-of-two scale that keeps the largest magnitude within e2m1's 6, then the nearest code.
pub fn quantize_mxfp4(w: &[f32], n: usize, k: usize) -> QuantMatrix {
    let mut words = vec![0u32; k / 8 * n];
    let mut scales = vec![0f32; k / GROUP * n];
    for (column, row) in w.chunks_exact(k).enumerate().take(n) {
        for (g, group) in row.chunks_exact(GROUP).enumerate() {
            let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let exponent = if amax > 0.0 { (amax / 6.0).log2().ceil() as i32 } else { 0 };
            // The slot scale holds half the block scale: codes decode to twice their value.
            scales[g * n + column] = pow2(exponent - 1);
            for (offset, &v) in group.iter().enumerate() {
                let r = g * GROUP + offset;
                let target = v / pow2(exponent);
                let code = (0..16u32)
                    .min_by(|&a, &b| {
                        let d = |c: u32| (e2m1_twice(c) as f32 / 2.0 - target).abs();
                        d(a).total_cmp(&d(b))
                    })
                    .unwrap_or(0);
                words[r / 8 * n + column] |= code << ((r % 8) as u32 * 4);
            }
        }
    }
    QuantMatrix { words, scales }
}

/// The weights a quantised matrix stands for, in checkpoint layout `[n, k]`.
pub fn dequantize(m: &QuantMatrix, n: usize, k: usize, bits: u32, fp4: bool) -> Vec<f32> {
    let zero = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for column in 0..n {
        for r in 0..k {
            let code = get_code(&m.words, n, column, r, bits);
            let value = if fp4 { e2m1_twice(code) } else { code as i32 - zero };
            w[column * k + r] = value as f32 * m.scales[r / GROUP * n + column];
        }
    }
    w
}

/// An expert quantised in slot layout: gate and up run over `hidden` (columns: intermediate
/// rows), down over `intermediate` (columns: hidden rows).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantExpert {
    pub dtype: ExpertDtype,
    pub gate: QuantMatrix,
    pub up: QuantMatrix,
    pub down: QuantMatrix,
}

impl QuantExpert {
    /// From checkpoint-layout f32 weights: gate, up `[inter, hidden]`, down `[hidden, inter]`.
    /// `dtype` must be a quantised format.
    pub fn new([gate, up, down]: &[Vec<f32>; 3], hidden: usize, inter: usize, dtype: ExpertDtype) -> Self {
        let q = |w: &[f32], n: usize, k: usize| match dtype {
            ExpertDtype::Mxfp4 => quantize_mxfp4(w, n, k),
            _ => quantize(w, n, k, dtype.bits().unwrap_or(8)),
        };
        Self { dtype, gate: q(gate, inter, hidden), up: q(up, inter, hidden), down: q(down, hidden, inter) }
    }

    /// The f32 weights it stands for, in checkpoint layout (for references and tests).
    pub fn dequantize(&self, hidden: usize, inter: usize) -> [Vec<f32>; 3] {
        let (bits, fp4) = (self.dtype.bits().unwrap_or(8), self.dtype.fp4());
        [
            dequantize(&self.gate, inter, hidden, bits, fp4),
            dequantize(&self.up, inter, hidden, bits, fp4),
            dequantize(&self.down, hidden, inter, bits, fp4),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_codes_sit_in_bit_planes_and_every_code_reads_back() {
        let (n, k) = (2, 64);
        let mut words = vec![0u32; code_rows(k, 3) * n];
        for r in 0..k {
            put_code(&mut words, n, 1, r, 3, (r * 5 % 8) as u32);
        }
        assert!((0..k).all(|r| get_code(&words, n, 1, r, 3) == (r * 5 % 8) as u32));
        assert!((0..k).all(|r| get_code(&words, n, 0, r, 3) == 0), "column 0 untouched");
        // Code 17 of the first group (5 = 0b101): low part 0b01 in word 1 at bit 2, high bit 17 in word 2.
        let mut one = vec![0u32; 3];
        put_code(&mut one, 1, 0, 17, 3, 5);
        assert_eq!(one, vec![0, 1 << 2, 1 << 17]);
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_groups_scale() {
        let (n, k) = (3, 64);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for bits in [8, 4, 3, 2] {
            let q = quantize(&w, n, k, bits);
            let back = dequantize(&q, n, k, bits, false);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let scale = q.scales[(i % k) / GROUP * n + i / k];
                assert!((a - b).abs() <= scale / 2.0 + 1e-6, "bits {bits} index {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn extremes_and_zero_groups_are_exact() {
        let (n, k) = (1, 64);
        let mut w = vec![0f32; k];
        w[0] = -2.0;
        w[1] = 2.0;
        let back = dequantize(&quantize(&w, n, k, 4), n, k, 4, false);
        assert_eq!(&back[..2], &[-2.0, 2.0]);
        assert!(back[2..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn e2m1_codes_decode_to_the_ocp_table_and_mxfp4_rounding_keeps_representable_values() {
        let table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for code in 0..16u32 {
            let want = if code < 8 { table[code as usize] } else { -table[code as usize - 8] };
            assert_eq!(e2m1_twice(code) as f32 / 2.0, want, "code {code}");
        }
        assert_eq!(pow2(-128), f32::from_bits(1 << 21));
        assert_eq!(pow2(3), 8.0);
        // A group of representable values (scale 2^-1: e2m1 values / 2) survives exactly.
        let (n, k) = (2, 64);
        let w: Vec<f32> = (0..n * k).map(|i| table[i % 8] / 2.0 * if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let q = quantize_mxfp4(&w, n, k);
        assert_eq!(dequantize(&q, n, k, 4, true), w);
    }

    #[test]
    fn sizes_count_codes_and_scales_and_bad_shapes_name_the_flag() {
        assert_eq!(ExpertDtype::F32.expert_bytes(64, 32), 3 * 64 * 32 * 4);
        assert_eq!(ExpertDtype::Int8.expert_bytes(64, 32), 3 * 64 * 32 + 3 * 64 * 32 / 32 * 4);
        assert_eq!(ExpertDtype::Int4.expert_bytes(64, 32), 3 * 64 * 32 / 2 + 3 * 64 * 32 / 32 * 4);
        assert_eq!(ExpertDtype::Int3.expert_bytes(64, 32), 3 * 64 * 32 * 3 / 8 + 3 * 64 * 32 / 32 * 4);
        let err = ExpertDtype::Int8.check(48, 40).unwrap_err().to_string();
        assert!(err.contains("--expert-dtype"), "{err}");
        assert!(ExpertDtype::F32.check(48, 40).is_ok());
    }
}
