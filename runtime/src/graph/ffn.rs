//! The SwiGLU feed-forward block used by dense layers, routed experts and shared experts.

use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::linear::{Linear, Loader};
use crate::error::Result;

/// `down(silu(gate(x)) * up(x))`.
pub struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGlu {
    /// Loads the three projections given their full weight-less prefixes (`...gate_proj`).
    pub fn load(loader: &Loader, prefixes: [&str; 3], hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Self {
            gate: loader.linear(prefixes[0], hidden, intermediate, false)?,
            up: loader.linear(prefixes[1], hidden, intermediate, false)?,
            down: loader.linear(prefixes[2], intermediate, hidden, false)?,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gated = silu(self.gate.forward(x.clone())) * self.up.forward(x);
        self.down.forward(gated)
    }
}
