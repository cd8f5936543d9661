//! Rotary position embeddings, HF "rotate half" layout (the first and second halves of a head
//! rotate together).

use burn::tensor::{Device, Tensor, TensorData};
pub use ferry_shaders::rope::apply;

use crate::spec::{RopeScaling, RopeSpec, YarnSpec};

pub struct Rope {
    inv_freq: Vec<f32>,
    position_scale: f32,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    amplitude: f32,
    head_dim: usize,
}

impl Rope {
    /// Tables for `head_dim` rotated lanes (MLA rotates only its rope part).
    pub fn new(spec: &RopeSpec, head_dim: usize) -> Self {
        // As transformers: inv_freq = 1 / theta^(2i/d), computed in f32.
        let base: Vec<f32> = (0..head_dim / 2).map(|i| spec.theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut inv_freq: Vec<f32> = base.iter().map(|b| 1.0 / b).collect();
        let (mut position_scale, mut amplitude) = (1.0, 1.0);
        match &spec.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => position_scale = 1.0 / factor,
            RopeScaling::Yarn(yarn) => {
                inv_freq = yarn_inv_freq(yarn, spec.theta, head_dim, &base);
                amplitude = yarn.attention_factor as f32;
            }
        }
        Self { inv_freq, position_scale, amplitude, head_dim }
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
                    cos.push(angle.cos() * self.amplitude);
                    sin.push(angle.sin() * self.amplitude);
                }
            }
        }
        let shape = [tokens, 1, self.head_dim];
        (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
    }
}

/// YaRN's frequencies as transformers' `_compute_yarn_parameters`: the correction range in f64
/// (rounded outward when `truncate`), the ramp and the blend in f32.
fn yarn_inv_freq(yarn: &YarnSpec, theta: f32, dim: usize, pos_freqs: &[f32]) -> Vec<f32> {
    let correction_dim = |rotations: f64| {
        let original = yarn.original_max_position_embeddings as f64;
        (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * f64::from(theta).ln())
    };
    let (mut low, mut high) = (correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow));
    if yarn.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001; // as transformers, against a zero-width ramp
    }
    let span = (high - low) as f32;
    let factor = yarn.factor as f32;
    pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let interpolated = 1.0 / (factor * p);
            interpolated * (1.0 - extrapolation) + (1.0 / p) * extrapolation
        })
        .collect()
}
