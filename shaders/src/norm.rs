//! RMSNorm over the last dimension, computed in f32 as HuggingFace does.
//!
//! One fused kernel (one workgroup per row) instead of burn's five element-wise and reduction
//! launches: decode is bound by launches, and a layer runs two to four norms.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeCount, CubeDim};

use crate::bridge::{from_cube, try_cube_float};

/// Units per row; each sums every `NORM_UNITS`-th square, then `cube_reduce` adds the partials,
/// so a row's result does not depend on the other rows of the launch.
const NORM_UNITS: usize = crate::reduce::UNITS;

/// `x * rsqrt(mean(x^2) + eps) * weight`, over the last dimension.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f32) -> Tensor<D> {
    let dims = x.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let rows_x = x.reshape([rows, width]);
    let (xc, wc) = match (try_cube_float(rows_x), try_cube_float(weight.clone())) {
        (Ok(xc), Ok(wc)) => (xc, wc),
        (Ok(xc), Err(_)) => return with_burn_ops(from_cube::<2>(xc), weight, eps).reshape(dims),
        (Err(rows_x), _) => return with_burn_ops(*rows_x, weight, eps).reshape(dims),
    };
    let out = empty_like(&xc, rows, width);
    let (count, dim, dtype) = launch_shape(&xc, rows);
    crate::launches::record(&count, &dim);
    kernel::rms_norm_kernel::launch(
        &xc.client.clone(),
        count,
        dim,
        xc.into_tensor_arg(),
        wc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        eps,
        dtype,
    );
    from_cube::<2>(out).reshape(dims)
}

/// The residual sum and its norm, in one launch: a decoder layer adds each block's output to
/// the residual stream and normalises the result for the next block. `y` holds `parts` rows per
/// row of `x` (a MoE block's weighted expert outputs, one per rank), summed in order before
/// they join `x`; with one part the sum is burn's element-wise `x + y`.
pub fn add_rms_norm(x: Tensor<2>, y: Tensor<2>, parts: usize, weight: &Tensor<1>, eps: f32) -> (Tensor<2>, Tensor<2>) {
    let [rows, width] = x.dims();
    debug_assert_eq!(y.dims(), [rows * parts, width], "add_rms_norm: {parts} parts per row");
    let cubes = (try_cube_float(x), try_cube_float(y), try_cube_float(weight.clone()));
    let (xc, yc, wc) = match cubes {
        (Ok(xc), Ok(yc), Ok(wc)) => (xc, yc, wc),
        (x, y, _) => {
            let back = |t: std::result::Result<CubeTensor, Box<Tensor<2>>>| t.map_or_else(|b| *b, from_cube::<2>);
            let y = back(y).reshape([rows, parts, width]).sum_dim(1).reshape([rows, width]);
            let sum = back(x) + y;
            return (sum.clone(), with_burn_ops(sum, weight, eps));
        }
    };
    let sum = empty_like(&xc, rows, width);
    let out = empty_like(&xc, rows, width);
    let (count, dim, dtype) = launch_shape(&xc, rows);
    crate::launches::record(&count, &dim);
    kernel::add_rms_norm_kernel::launch(
        &xc.client.clone(),
        count,
        dim,
        xc.into_tensor_arg(),
        yc.into_tensor_arg(),
        wc.into_tensor_arg(),
        sum.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        parts as u32,
        eps,
        dtype,
    );
    (from_cube::<2>(sum), from_cube::<2>(out))
}

fn empty_like(like: &CubeTensor, rows: usize, width: usize) -> CubeTensor {
    burn_cubecl::ops::numeric::empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        [rows, width].into(),
        like.dtype,
    )
}

/// One cube per row; rows beyond one dimension's 65535 cubes spill into the second.
fn launch_shape(like: &CubeTensor, rows: usize) -> (CubeCount, CubeDim, cubecl::prelude::ElemType) {
    let across = rows.clamp(1, 65535) as u32;
    let count = CubeCount::Static(across, (rows as u32).div_ceil(across), 1);
    (count, CubeDim::new_1d(NORM_UNITS as u32), dtype_to_storage_type(like.dtype))
}

/// The same norm as burn ops (the fallback for another backend).
fn with_burn_ops<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f32) -> Tensor<D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed * weight.clone().unsqueeze::<D>()
}

/// The norm on the host, over rows of `width` values, as the kernel computes it (the sum of
/// squares in f32).
pub fn rms_norm_reference(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    x.chunks_exact(width)
        .flat_map(|row| {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| v * scale * w)
        })
        .collect()
}

/// `add_rms_norm` on the host: `y` holds `parts` rows per row of `x`, added in order, then to
/// `x`. Returns the sum and its norm.
pub fn add_rms_norm_reference(x: &[f32], y: &[f32], parts: usize, weight: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = weight.len();
    let sum: Vec<f32> = x
        .chunks_exact(width)
        .enumerate()
        .flat_map(|(r, row)| {
            (0..width).map(move |j| {
                let part = |p: usize| y[(r * parts + p) * width + j];
                row[j] + (1..parts).fold(part(0), |s, p| s + part(p))
            })
        })
        .collect();
    let normed = rms_norm_reference(&sum, weight, eps);
    (sum, normed)
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use super::NORM_UNITS;
    use crate::reduce::cube_reduce;

    /// One cube per row of `x` `[rows, width]` (any strides); `out` is contiguous.
    #[cube(launch)]
    pub(super) fn rms_norm_kernel<F: Float>(
        x: &Tensor<F>,
        weight: &Tensor<F>,
        out: &mut Tensor<F>,
        rows: u32,
        eps: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let row = CUBE_POS;
        // Whole cubes leave together, so no unit misses a barrier.
        if row >= rows as usize {
            terminate!();
        }
        let width = x.shape(1);
        let base = row * x.stride(0);
        let step = x.stride(1);
        let mut squares = F::new(0.0);
        let mut j = UNIT_POS_X as usize;
        while j < width {
            let v = x[base + j * step];
            squares += v * v;
            j += comptime!(NORM_UNITS);
        }
        let scale = row_scale::<F>(squares, width, eps);
        let mut j = UNIT_POS_X as usize;
        while j < width {
            out[row * width + j] = x[base + j * step] * scale * weight[j];
            j += comptime!(NORM_UNITS);
        }
    }

    /// `sum = x + (y[row * parts] + ... + y[row * parts + parts - 1])` (any strides, `sum`
    /// contiguous) and its norm into `out`, one cube per row.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and scalars, passed through
    pub(super) fn add_rms_norm_kernel<F: Float>(
        x: &Tensor<F>,
        y: &Tensor<F>,
        weight: &Tensor<F>,
        sum: &mut Tensor<F>,
        out: &mut Tensor<F>,
        rows: u32,
        parts: u32,
        eps: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let width = x.shape(1);
        let at = row * width;
        let mut squares = F::new(0.0);
        let mut j = UNIT_POS_X as usize;
        while j < width {
            let v = residual_sum::<F>(x, y, row, parts as usize, j);
            sum[at + j] = v;
            squares += v * v;
            j += comptime!(NORM_UNITS);
        }
        let scale = row_scale::<F>(squares, width, eps);
        let mut j = UNIT_POS_X as usize;
        while j < width {
            out[at + j] = residual_sum::<F>(x, y, row, parts as usize, j) * scale * weight[j];
            j += comptime!(NORM_UNITS);
        }
    }

    /// `x[row, j]` plus the row's parts of `y` at column `j`, the parts added first, in order.
    #[cube]
    fn residual_sum<F: Float>(x: &Tensor<F>, y: &Tensor<F>, row: usize, parts: usize, j: usize) -> F {
        let first = row * parts;
        let mut s = y[first * y.stride(0) + j * y.stride(1)];
        for p in 1..parts {
            s += y[(first + p) * y.stride(0) + j * y.stride(1)];
        }
        x[row * x.stride(0) + j * x.stride(1)] + s
    }

    /// `rsqrt(mean + eps)` of a row from the units' partial sums of squares.
    #[cube]
    fn row_scale<F: Float>(squares: F, width: usize, eps: f32) -> F {
        let total = cube_reduce::<F>(squares, false);
        F::new(1.0) / F::sqrt(total / F::cast_from(width) + F::cast_from(eps))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use crate::testing::{device, max_diff, random};

    /// The fused kernel equals the host reference up to summation order: widths below, at and
    /// above the cube's units, a strided (sliced) input, and more rows than one launch
    /// dimension holds.
    #[test]
    fn fused_norm_matches_the_cpu_reference() {
        let device = &device();
        for (rows, width) in [(3, 5), (2, 64), (4, 200), (70_000, 3)] {
            let xs = random(rows * width, 1, 3.0);
            let ws = random(width, 2, 3.0);
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [rows, width]), device);
            let w = Tensor::<1>::from_data(TensorData::new(ws.clone(), [width]), device);
            let got: Vec<f32> = super::rms_norm(x, &w, 1e-6).into_data().try_to_vec().unwrap();
            let diff = max_diff(&got, &super::rms_norm_reference(&xs, &ws, 1e-6));
            assert!(diff < 1e-5, "rows {rows} width {width}: max diff {diff}");
        }
        // A view of every other column block: strides the kernel must follow.
        let xs = random(2 * 3 * 40, 3, 3.0);
        let x = Tensor::<3>::from_data(TensorData::new(xs.clone(), [2, 3, 40]), device);
        let view = x.slice([0..2, 0..3, 8..40]);
        let ws = random(32, 4, 3.0);
        let w = Tensor::<1>::from_data(TensorData::new(ws.clone(), [32]), device);
        let got: Vec<f32> = super::rms_norm(view, &w, 1e-5).into_data().try_to_vec().unwrap();
        let viewed: Vec<f32> = xs.chunks_exact(40).flat_map(|row| row[8..].to_vec()).collect();
        let diff = max_diff(&got, &super::rms_norm_reference(&viewed, &ws, 1e-5));
        assert!(diff < 1e-5, "sliced input: max diff {diff}");
    }

    /// The fused residual add returns exactly burn's sum and its norm, also for a strided
    /// residual and more rows than the cube has units; several parts per row are added in
    /// order, then to the residual, exactly as the reference adds them.
    #[test]
    fn fused_add_and_norm_match_burn_sums_and_the_cpu_reference() {
        let device = &device();
        for (rows, width) in [(1, 5), (3, 200), (70, 64)] {
            let wide = random(rows * 2 * width, 5, 3.0);
            let x = Tensor::<2>::from_data(TensorData::new(wide.clone(), [rows, 2 * width]), device)
                .slice([0..rows, width..2 * width]);
            let ys = random(rows * width, 6, 3.0);
            let y = Tensor::<2>::from_data(TensorData::new(ys.clone(), [rows, width]), device);
            let ws = random(width, 7, 3.0);
            let w = Tensor::<1>::from_data(TensorData::new(ws.clone(), [width]), device);
            let (sum, normed) = super::add_rms_norm(x.clone(), y.clone(), 1, &w, 1e-6);
            let got: Vec<f32> = sum.into_data().try_to_vec().unwrap();
            let want: Vec<f32> = (x + y).into_data().try_to_vec().unwrap();
            assert_eq!(got, want, "rows {rows} width {width}: the sum differs from burn's");
            let xs: Vec<f32> = wide.chunks_exact(2 * width).flat_map(|row| row[width..].to_vec()).collect();
            let (want_sum, want_normed) = super::add_rms_norm_reference(&xs, &ys, 1, &ws, 1e-6);
            assert_eq!(got, want_sum, "rows {rows} width {width}: the sum differs from the reference");
            let got: Vec<f32> = normed.into_data().try_to_vec().unwrap();
            let diff = max_diff(&got, &want_normed);
            assert!(diff < 1e-5, "rows {rows} width {width}: max diff {diff}");
        }
        let (rows, parts, width) = (2, 3, 70);
        let xs = random(rows * width, 8, 3.0);
        let ys = random(rows * parts * width, 9, 3.0);
        let ws = random(width, 10, 3.0);
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [rows, width]), device);
        let y = Tensor::<2>::from_data(TensorData::new(ys.clone(), [rows * parts, width]), device);
        let w = Tensor::<1>::from_data(TensorData::new(ws.clone(), [width]), device);
        let (sum, _) = super::add_rms_norm(x, y, parts, &w, 1e-6);
        let got: Vec<f32> = sum.into_data().try_to_vec().unwrap();
        assert_eq!(got, super::add_rms_norm_reference(&xs, &ys, parts, &ws, 1e-6).0, "parts added in order");
    }
}
