//! Rotary position embeddings, HF "rotate half" layout (the first and second halves of a head
//! rotate together).

use burn::tensor::{Device, Tensor, TensorData};

use crate::spec::{RopeScaling, RopeSpec};

pub struct Rope {
    inv_freq: Vec<f32>,
    position_scale: f32,
    head_dim: usize,
}

impl Rope {
    pub fn new(spec: &RopeSpec, head_dim: usize) -> Self {
        // As transformers: inv_freq = 1 / theta^(2i/d), computed in f32.
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / spec.theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let position_scale = match spec.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        Self { inv_freq, position_scale, head_dim }
    }

    /// `(cos, sin)` tables `[tokens, 1, head_dim]` for positions `start..start + tokens`.
    pub fn tables(&self, start: usize, tokens: usize, device: &Device) -> (Tensor<3>, Tensor<3>) {
        let mut cos = Vec::with_capacity(tokens * self.head_dim);
        let mut sin = Vec::with_capacity(tokens * self.head_dim);
        for p in start..start + tokens {
            let pos = p as f32 * self.position_scale;
            // emb = cat(freqs, freqs): both halves use the same angles.
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = [tokens, 1, self.head_dim];
        (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
    }
}

/// Applies the rotation to `x` `[tokens, heads, head_dim]`.
pub fn apply(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let [t, h, d] = x.dims();
    let first = x.clone().slice([0..t, 0..h, 0..d / 2]);
    let second = x.clone().slice([0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 2);
    x * cos.clone() + rotated * sin.clone()
}
