//! Group-wise quantised experts (`--expert-dtype int8|int4|int3|int2|mxfp4`): one scale per `GROUP` weights
//! along the dimension a dot product runs over (symmetric, absmax / qmax), codes packed into u32
//! words in the slot's own layout, dequantised inside the grouped expert kernel. Quantised
//! experts are smaller in host RAM, on the link and in their GPU slots; they are an
//! approximation, so `ferry eval` measures what they cost.

use ferry_shaders::format::{GROUP, QuantMatrix, dequantize, quantize, quantize_mxfp4};

use crate::error::{FerryError, Result};

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
