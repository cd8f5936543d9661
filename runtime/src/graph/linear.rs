//! Weights from the store to GPU tensors, and the linear projection that uses them.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use ferry_shaders::matvec::{MAX_ROWS, matvec, matvec_bf16};
use ferry_shaders::panel::{self, Layout, PANEL, from_panels, to_panels};
use ferry_shaders::split::Split;
use ferry_shaders::{from_cube, pairs, try_cube_float};

use crate::error::{FerryError, Result};
use crate::options::DenseDtype;
use crate::weights::WeightStore;

/// A projection matrix `W^T` `[in, out]` as stored on the device (`--dense-dtype`): f32 or f16
/// values, or bf16 pairs along `in` (`ferry_shaders::pairs`: words in an f32 tensor
/// `[in / 2, out]`); in blocks of output columns where the whole would not fit one binding (each
/// output's dot product stays whole in one block, so the split changes no result). A block whose
/// width divides into panels is kept in panels (`ferry_shaders::panel`), what the decode kernel
/// reads fastest. Clones share the GPU tensors.
#[derive(Clone)]
pub struct StoredMatrix {
    blocks: Vec<Block>,
    pairs: bool,
    /// The largest buffer a block may take, in bytes.
    limit: u64,
    /// How the matrix-vector kernel splits each output's dot product.
    split: Split,
}

/// One block of a stored matrix: `[in, out]` (or pairs `[in / 2, out]`) values, whose bits lie
/// as `layout` says.
#[derive(Clone)]
struct Block {
    values: Tensor<2>,
    layout: Layout,
}

impl Block {
    /// Blocks with the same inputs side by side (`ferry_shaders::panel::cat`).
    fn cat(blocks: Vec<Block>) -> Result<Block> {
        let (values, layout) = panel::cat(blocks.into_iter().map(|b| (b.values, b.layout)).collect())
            .map_err(|e| FerryError::Gpu(format!("joining projections: {e}")))?;
        Ok(Block { values, layout })
    }

    /// `values` in panels where its width divides into them, else as they are.
    fn new(values: Tensor<2>) -> Result<Block> {
        if !values.dims()[1].is_multiple_of(PANEL) {
            return Ok(Block { values, layout: Layout::Rows });
        }
        let values = to_panels(values).map_err(|e| FerryError::Gpu(format!("a projection into panels: {e}")))?;
        Ok(Block { values, layout: Layout::Panels })
    }

    fn dims(&self) -> [usize; 2] {
        self.values.dims()
    }

    /// The values in plain rows.
    fn rows(&self) -> Tensor<2> {
        match (self.layout, try_cube_float(self.values.clone())) {
            (Layout::Panels, Ok(c)) => from_panels(&c),
            _ => self.values.clone(),
        }
    }
}

impl StoredMatrix {
    /// Output columns.
    pub fn outputs(&self) -> usize {
        self.blocks.iter().map(|b| b.dims()[1]).sum()
    }

    /// `x W (+ bias)`: the matrix-vector kernel reads the stored format as it is when `x` is
    /// decode-shaped (at most `matvec::MAX_ROWS` rows); a prefill widens it for burn's matmul.
    /// A split matrix runs block by block, its outputs joined.
    pub fn product(&self, x: &Tensor<2>, bias: Option<&Tensor<1>>) -> Tensor<2> {
        if let [block] = &self.blocks[..] {
            return self.block_product(block, x, bias);
        }
        let mut start = 0;
        let parts = self
            .blocks
            .iter()
            .map(|block| {
                let width = block.dims()[1];
                let b = bias.map(|b| b.clone().narrow(0, start, width));
                start += width;
                self.block_product(block, x, b.as_ref())
            })
            .collect();
        Tensor::cat(parts, 1)
    }

    fn block_product(&self, block: &Block, x: &Tensor<2>, bias: Option<&Tensor<1>>) -> Tensor<2> {
        if x.dims()[0] <= MAX_ROWS
            && let Ok(w) = try_cube_float(block.values.clone())
        {
            let (split, layout) = (self.split, block.layout);
            let y =
                if self.pairs { matvec_bf16(x, &w, bias, split, layout) } else { matvec(x, &w, bias, split, layout) };
            if let Some(y) = y {
                return y;
            }
        }
        let y = x.clone().matmul(self.as_f32(block));
        match bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// A block's values as burn's matmul takes them: in plain rows, f16 widened, bf16 pairs
    /// unpacked (a prefill's cost; a decode step reads them as they are).
    fn as_f32(&self, block: &Block) -> Tensor<2> {
        let rows = block.rows();
        match (self.pairs, try_cube_float(rows.clone())) {
            (true, Ok(words)) => pairs::unpack(&words),
            _ => rows.cast(FloatDType::F32),
        }
    }

    /// Bytes of the stored matrix.
    fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| (b.dims()[0] * b.dims()[1] * b.values.dtype().size()) as u64).sum()
    }

    /// Matrices with the same inputs side by side (one stored format): one block where they fit
    /// one buffer together, else their blocks in order.
    fn cat(parts: &[&StoredMatrix]) -> Result<StoredMatrix> {
        let limit = parts.iter().map(|p| p.limit).min().unwrap_or(u64::MAX);
        let pairs = parts.first().is_some_and(|p| p.pairs);
        let split = parts.first().map_or(Split::WHOLE, |p| p.split);
        let whole = parts.iter().map(|p| p.bytes()).sum::<u64>() <= limit;
        let blocks: Vec<Block> = parts.iter().flat_map(|p| p.blocks.iter().cloned()).collect();
        let blocks = if whole && blocks.len() > 1 { vec![Block::cat(blocks)?] } else { blocks };
        Ok(StoredMatrix { blocks, pairs, limit, split })
    }
}

/// `y = x W^T + b`, with `W^T` kept as `[in, out]` so the product is one plain matmul. Clones
/// share the GPU tensors.
#[derive(Clone)]
pub struct Linear {
    weight_t: StoredMatrix,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.weight_t.product(&x, self.bias.as_ref())
    }

    /// Output columns.
    pub fn outputs(&self) -> usize {
        self.weight_t.outputs()
    }

    /// One projection whose outputs are `parts`' outputs side by side (same inputs), so that a
    /// decode step runs one launch instead of one per part. A part without a bias gets zeros
    /// when another has one.
    pub fn concat(parts: &[&Linear]) -> Result<Linear> {
        let weight_t = StoredMatrix::cat(&parts.iter().map(|p| &p.weight_t).collect::<Vec<_>>())?;
        let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
            let device = weight_t.blocks[0].values.device();
            Tensor::cat(
                parts.iter().map(|p| p.bias.clone().unwrap_or_else(|| Tensor::zeros([p.outputs()], &device))).collect(),
                0,
            )
        });
        Ok(Linear { weight_t, bias })
    }
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
    /// The largest buffer one block of a projection may take (the adapter's binding limit, or
    /// a smaller page size asked for).
    pub limit: u64,
    /// How decode kernels split their dot products on this adapter.
    pub split: Split,
    /// Whether MoE layers route with the device kernel (`--route-on`, resolved for the adapter).
    pub route_on_device: bool,
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
        // Blocks of output columns (rows of the checkpoint's `[out, in]`) that fit a buffer,
        // an even count for bf16 pairs' sake.
        let per_column = (inputs * self.dense.bytes() as usize).max(1) as u64;
        let columns = ((self.limit / per_column) as usize).min(outputs);
        if columns == 0 {
            return Err(FerryError::Gpu(format!(
                "{name}: one output column of {inputs} inputs takes {per_column} bytes, more than this adapter's largest buffer ({} bytes)",
                self.limit
            )));
        }
        let mut blocks = Vec::with_capacity(outputs.div_ceil(columns));
        for first in (0..outputs).step_by(columns) {
            let width = columns.min(outputs - first);
            let rows = &weight[first * inputs..(first + width) * inputs];
            let block =
                Tensor::from_data(TensorData::new(transpose(rows, width, inputs), [inputs, width]), self.device);
            blocks.push(self.stored(block, &name)?);
        }
        let weight_t = StoredMatrix::cat(&blocks.iter().collect::<Vec<_>>())?;
        let bias = if bias {
            let values = reorder(self.store.f32(&format!("{prefix}.bias"), &[outputs])?, 1);
            Some(Tensor::from_data(TensorData::new(values, [outputs]), self.device))
        } else {
            None
        };
        Ok(Linear { weight_t, bias })
    }

    /// A projection matrix `[in, out]` (f32, the tensor `name`'s values) in the stored format
    /// (`--dense-dtype`).
    pub fn stored(&self, weight: Tensor<2>, name: &str) -> Result<StoredMatrix> {
        let (t, pairs) = match self.dense {
            DenseDtype::F32 => (weight, false),
            DenseDtype::F16 => (weight.cast(FloatDType::F16), false),
            DenseDtype::Bf16 => {
                let packed = pairs::pack(weight)
                    .map_err(|e| FerryError::flag("--dense-dtype", format!("bf16 cannot store {name:?}: {e}")))?;
                (packed, true)
            }
        };
        Ok(StoredMatrix { blocks: vec![Block::new(t)?], pairs, limit: self.limit, split: self.split })
    }
}

/// The width a checkpoint stores its projections in, as the format that keeps them exactly
/// (`--dense-dtype auto`): bf16 when layer 0's attention output projection is BF16, else f32
/// (f16 projections need `shader-f16`; `--dense-dtype f16` is exact for F16 checkpoints).
pub fn stored_dense_dtype(store: &WeightStore, spec: &crate::spec::ModelSpec) -> DenseDtype {
    let names = &spec.names;
    let o_proj = names.layer(0, &format!("{}.o_proj.weight", names.attention));
    match store.tensor(&o_proj) {
        Some(t) if t.dtype == crate::weights::SourceDtype::BF16 => DenseDtype::Bf16,
        _ => DenseDtype::F32,
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
