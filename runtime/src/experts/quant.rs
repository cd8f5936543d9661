//! Group-wise quantised experts (`--expert-dtype int8|int4`): one scale per `GROUP` weights
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
    Int8,
    Int4,
}

impl std::str::FromStr for ExpertDtype {
    type Err = FerryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(FerryError::flag("--expert-dtype", format!("unknown dtype {other:?}; use f32, int8 or int4"))),
        }
    }
}

impl std::fmt::Display for ExpertDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

impl ExpertDtype {
    /// Bits per quantised weight; None for f32.
    pub fn bits(self) -> Option<u32> {
        match self {
            Self::F32 => None,
            Self::Int8 => Some(8),
            Self::Int4 => Some(4),
        }
    }

    /// Bytes of one expert (gate, up, down of `hidden x intermediate`) in this format.
    pub fn expert_bytes(self, hidden: usize, inter: usize) -> u64 {
        let weights = (3 * hidden * inter) as u64;
        match self.bits() {
            None => weights * 4,
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

/// One matrix in slot layout: `k` reduction rows by `n` columns, codes packed along `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// `[k / per_word, n]`: word `(r, c)` holds the codes of rows `r*per_word ..` of column `c`,
    /// the first in the lowest bits. A code is the signed value plus `2^(bits-1)`.
    pub words: Vec<u32>,
    /// `[k / GROUP, n]`.
    pub scales: Vec<f32>,
}

/// Quantises `w`, given in checkpoint layout `[n, k]` (one row per output, over the reduction
/// dimension), into slot layout.
pub fn quantize(w: &[f32], n: usize, k: usize, bits: u32) -> QuantMatrix {
    let per_word = (32 / bits) as usize;
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let zero = 1i32 << (bits - 1);
    let mut words = vec![0u32; k / per_word * n];
    let mut scales = vec![0f32; k / GROUP * n];
    for (column, row) in w.chunks_exact(k).enumerate().take(n) {
        for (g, group) in row.chunks_exact(GROUP).enumerate() {
            let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / qmax } else { 1.0 };
            scales[g * n + column] = scale;
            for (offset, &v) in group.iter().enumerate() {
                let r = g * GROUP + offset;
                let code = ((v / scale).round().clamp(-qmax, qmax) as i32 + zero) as u32;
                words[r / per_word * n + column] |= code << ((r % per_word) as u32 * bits);
            }
        }
    }
    QuantMatrix { words, scales }
}

/// The weights a quantised matrix stands for, in checkpoint layout `[n, k]`.
pub fn dequantize(m: &QuantMatrix, n: usize, k: usize, bits: u32) -> Vec<f32> {
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let zero = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for column in 0..n {
        for r in 0..k {
            let code = (m.words[r / per_word * n + column] >> ((r % per_word) as u32 * bits)) & mask;
            w[column * k + r] = (code as i32 - zero) as f32 * m.scales[r / GROUP * n + column];
        }
    }
    w
}

/// An expert quantised in slot layout: gate and up run over `hidden` (columns: intermediate
/// rows), down over `intermediate` (columns: hidden rows).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantExpert {
    pub bits: u32,
    pub gate: QuantMatrix,
    pub up: QuantMatrix,
    pub down: QuantMatrix,
}

impl QuantExpert {
    /// From checkpoint-layout f32 weights: gate, up `[inter, hidden]`, down `[hidden, inter]`.
    pub fn new([gate, up, down]: &[Vec<f32>; 3], hidden: usize, inter: usize, bits: u32) -> Self {
        Self {
            bits,
            gate: quantize(gate, inter, hidden, bits),
            up: quantize(up, inter, hidden, bits),
            down: quantize(down, hidden, inter, bits),
        }
    }

    /// The f32 weights it stands for, in checkpoint layout (for references and tests).
    pub fn dequantize(&self, hidden: usize, inter: usize) -> [Vec<f32>; 3] {
        [
            dequantize(&self.gate, inter, hidden, self.bits),
            dequantize(&self.up, inter, hidden, self.bits),
            dequantize(&self.down, hidden, inter, self.bits),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_groups_scale() {
        let (n, k) = (3, 64);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for bits in [8, 4] {
            let q = quantize(&w, n, k, bits);
            let back = dequantize(&q, n, k, bits);
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
        let back = dequantize(&quantize(&w, n, k, 4), n, k, 4);
        assert_eq!(&back[..2], &[-2.0, 2.0]);
        assert!(back[2..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn sizes_count_codes_and_scales_and_bad_shapes_name_the_flag() {
        assert_eq!(ExpertDtype::F32.expert_bytes(64, 32), 3 * 64 * 32 * 4);
        assert_eq!(ExpertDtype::Int8.expert_bytes(64, 32), 3 * 64 * 32 + 3 * 64 * 32 / 32 * 4);
        assert_eq!(ExpertDtype::Int4.expert_bytes(64, 32), 3 * 64 * 32 / 2 + 3 * 64 * 32 / 32 * 4);
        let err = ExpertDtype::Int8.check(48, 40).unwrap_err().to_string();
        assert!(err.contains("--expert-dtype"), "{err}");
        assert!(ExpertDtype::F32.check(48, 40).is_ok());
    }
}
