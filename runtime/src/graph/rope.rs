//! Rotary position embeddings, HF "rotate half" layout (the first and second halves of a head
//! rotate together).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{Device, Tensor, TensorData};
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use crate::experts::{from_cube, try_cube_float};

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

/// Applies the rotation to `x` `[tokens, heads, head_dim]` (any strides: MLA passes a view of
/// its rope lanes), in one fused kernel rather than burn's slices, negation, concatenation and
/// three element-wise ops.
pub fn apply(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let dims = x.dims();
    let (xc, cc, sc) = match (try_cube_float(x), try_cube_float(cos.clone()), try_cube_float(sin.clone())) {
        (Ok(xc), Ok(cc), Ok(sc)) => (xc, cc, sc),
        (Ok(xc), _, _) => return reference(from_cube(xc), cos, sin),
        (Err(x), _, _) => return reference(*x, cos, sin),
    };
    let client = xc.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype(client.clone(), xc.device.clone(), dims.into(), xc.dtype);
    let elems = dims.iter().product::<usize>();
    let dim = CubeDim::new(&client, elems);
    let count = calculate_cube_count_elemwise(&client, elems, dim);
    let dtype = dtype_to_storage_type(xc.dtype);
    kernel::rope_kernel::launch(
        &client,
        count,
        dim,
        xc.into_tensor_arg(),
        cc.into_tensor_arg(),
        sc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype,
    );
    from_cube(out)
}

/// `x * cos + rotate_half(x) * sin` as burn ops (the fallback, and the tests' reference).
fn reference(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let [t, h, d] = x.dims();
    let first = x.clone().slice([0..t, 0..h, 0..d / 2]);
    let second = x.clone().slice([0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 2);
    x * cos.clone() + rotated * sin.clone()
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// One unit per element of `out` `[tokens, heads, d]` (contiguous); `cos`/`sin` `[tokens, 1, d]`.
    #[cube(launch)]
    pub(super) fn rope_kernel<F: Float>(
        x: &Tensor<F>,
        cos: &Tensor<F>,
        sin: &Tensor<F>,
        out: &mut Tensor<F>,
        #[define(F)] _dtype: ElemType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= out.len() {
            terminate!();
        }
        let d = out.shape(2);
        let heads = out.shape(1);
        let i = pos % d;
        let h = (pos / d) % heads;
        let t = pos / (d * heads);
        let half = d / 2;
        let base = t * x.stride(0) + h * x.stride(1);
        let lane = x.stride(2);
        let rotated = if i < half { -x[base + (i + half) * lane] } else { x[base + (i - half) * lane] };
        let at = t * cos.stride(0) + i * cos.stride(2);
        out[pos] = x[base + i * lane] * cos[at] + rotated * sin[at];
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::Rope;
    use crate::device::{AdapterChoice, Gpu};
    use crate::spec::{RopeScaling, RopeSpec};

    /// The fused kernel gives burn's ops' values, on a contiguous input and on a strided view
    /// (MLA's rope lanes at the end of each head).
    #[test]
    fn fused_rotation_matches_burn_ops() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        let rope = Rope::new(&RopeSpec { theta: 10000.0, scaling: RopeScaling::None }, 8);
        let (cos, sin) = rope.tables(5, 3, device);
        let values: Vec<f32> = (0..3 * 4 * 12).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let x = Tensor::<3>::from_data(TensorData::new(values, [3, 4, 12]), device);
        for input in [x.clone().slice([0..3, 0..4, 4..12]), x.slice([0..3, 0..4, 0..8])] {
            let got: Vec<f32> = super::apply(input.clone(), &cos, &sin).into_data().try_to_vec().unwrap();
            let want: Vec<f32> = super::reference(input, &cos, &sin).into_data().try_to_vec().unwrap();
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-6, "max diff {diff}");
        }
    }
}
