//! Weights from the store to GPU tensors, and the linear projection that uses them.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use ferry_shaders::matvec::{MAX_ROWS, matvec};
use ferry_shaders::{from_cube, try_cube_float};

use crate::error::Result;
use crate::options::DenseDtype;
use crate::weights::WeightStore;

/// `y = x W^T + b`, with `W^T` kept as `[in, out]` so the product is one plain matmul. Clones
/// share the GPU tensors.
#[derive(Clone)]
pub struct Linear {
    weight_t: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        if let Some(y) = decode_product(&x, &self.weight_t, self.bias.as_ref()) {
            return y;
        }
        let y = x.matmul(as_f32(&self.weight_t));
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Output columns.
    pub fn outputs(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// One projection whose outputs are `parts`' outputs side by side (same inputs), so that a
    /// decode step runs one launch instead of one per part. A part without a bias gets zeros
    /// when another has one.
    pub fn concat(parts: &[&Linear]) -> Linear {
        let weight_t = Tensor::cat(parts.iter().map(|p| p.weight_t.clone()).collect(), 1);
        let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
            let device = weight_t.device();
            Tensor::cat(
                parts.iter().map(|p| p.bias.clone().unwrap_or_else(|| Tensor::zeros([p.outputs()], &device))).collect(),
                0,
            )
        });
        Linear { weight_t, bias }
    }
}

/// `x wt (+ bias)` by the matrix-vector kernel when `x` is decode-shaped (at most
/// `matvec::MAX_ROWS` rows) and the tensors are CubeCL's; None otherwise.
pub fn decode_product(x: &Tensor<2>, wt: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<2>> {
    if x.dims()[0] > MAX_ROWS {
        return None;
    }
    matvec(x, &try_cube_float(wt.clone()).ok()?, bias)
}

/// A stored projection as burn's matmul takes it: f16 weights are widened for the product (a
/// prefill's cost; a decode step reads them as they are).
pub fn as_f32(wt: &Tensor<2>) -> Tensor<2> {
    wt.clone().cast(FloatDType::F32)
}

/// `t` transposed into a contiguous tensor, on the device (burn's matmul reads a transposed view
/// as well, but the matrix-vector kernel wants `[in, out]` rows).
pub fn transposed(t: Tensor<2>) -> Tensor<2> {
    match try_cube_float(t.transpose()) {
        Ok(c) => from_cube(burn_cubecl::kernel::into_contiguous(c)),
        Err(view) => *view,
    }
}

/// Reads tensors by HuggingFace name, checks their shapes, and puts them on the device as f32.
pub struct Loader<'a> {
    pub store: &'a WeightStore,
    pub device: &'a Device,
    /// How projection matrices are stored.
    pub dense: DenseDtype,
}

impl Loader<'_> {
    /// A `[rows, cols]` matrix in the checkpoint's own layout.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>> {
        let values = self.store.f32(name, &[rows, cols])?;
        Ok(Tensor::from_data(TensorData::new(values, [rows, cols]), self.device))
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor<1>> {
        let values = self.store.f32(name, &[len])?;
        Ok(Tensor::from_data(TensorData::new(values, [len]), self.device))
    }

    /// A linear layer stored HF-style as `{prefix}.weight` `[out, in]` (and `{prefix}.bias`).
    pub fn linear(&self, prefix: &str, inputs: usize, outputs: usize, bias: bool) -> Result<Linear> {
        self.linear_rows(prefix, inputs, outputs, bias, None)
    }

    /// `linear` with its outputs reordered: output `i` is the checkpoint's output `rows[i]`.
    pub fn linear_rows(
        &self,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
        rows: Option<&[usize]>,
    ) -> Result<Linear> {
        let reorder = |values: Vec<f32>, width: usize| match rows {
            None => values,
            Some(rows) => rows.iter().flat_map(|&r| values[r * width..(r + 1) * width].iter().copied()).collect(),
        };
        let name = format!("{prefix}.weight");
        let weight = reorder(self.store.f32(&name, &[outputs, inputs])?, inputs);
        let weight_t = self.stored(Tensor::from_data(
            TensorData::new(transpose(&weight, outputs, inputs), [inputs, outputs]),
            self.device,
        ));
        let bias = if bias {
            let values = reorder(self.store.f32(&format!("{prefix}.bias"), &[outputs])?, 1);
            Some(Tensor::from_data(TensorData::new(values, [outputs]), self.device))
        } else {
            None
        };
        Ok(Linear { weight_t, bias })
    }

    /// A projection matrix in the stored format (`--dense-dtype`).
    pub fn stored(&self, weight: Tensor<2>) -> Tensor<2> {
        match self.dense {
            DenseDtype::F32 => weight,
            DenseDtype::F16 => weight.cast(FloatDType::F16),
        }
    }
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_swaps_rows_and_columns() {
        assert_eq!(super::transpose(&[1., 2., 3., 4., 5., 6.], 2, 3), vec![1., 4., 2., 5., 3., 6.]);
    }
}
