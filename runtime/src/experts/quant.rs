//! Group-wise quantised experts (`--expert-dtype int8|int4|int3|int2|mxfp4`): one scale per `GROUP` weights
//! along the dimension a dot product runs over (symmetric, absmax / qmax), codes packed into u32
//! words in the slot's own layout, dequantised inside the grouped expert kernel. Quantised
//! experts are smaller in host RAM, on the link and in their GPU slots; they are an
//! approximation, so `ferry eval` measures what they cost.

use ferry_shaders::format::{QuantMatrix, dequantize, quantize, quantize_mxfp4};

use crate::options::ExpertDtype;

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
