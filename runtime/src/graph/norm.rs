//! RMSNorm over the last dimension, computed in f32 as HuggingFace does.
//!
//! One fused kernel (one workgroup per row) instead of burn's five element-wise and reduction
//! launches: decode is bound by launches, and a layer runs two to four norms.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeCount, CubeDim};

use crate::experts::{from_cube, try_cube_float};

/// Units per row; each sums every `NORM_UNITS`-th square, then `cube_reduce` adds the partials,
/// so a row's result does not depend on the other rows of the launch.
const NORM_UNITS: usize = super::cube_reduce::UNITS;

/// `x * rsqrt(mean(x^2) + eps) * weight`, over the last dimension.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f32) -> Tensor<D> {
    let dims = x.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let rows_x = x.reshape([rows, width]);
    let (xc, wc) = match (try_cube_float(rows_x), try_cube_float(weight.clone())) {
        (Ok(xc), Ok(wc)) => (xc, wc),
        (Ok(xc), Err(_)) => return reference(from_cube::<2>(xc), weight, eps).reshape(dims),
        (Err(rows_x), _) => return reference(*rows_x, weight, eps).reshape(dims),
    };
    let out = empty_like(&xc, rows, width);
    let (count, dim, dtype) = launch_shape(&xc, rows);
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
            return (sum.clone(), reference(sum, weight, eps));
        }
    };
    let sum = empty_like(&xc, rows, width);
    let out = empty_like(&xc, rows, width);
    let (count, dim, dtype) = launch_shape(&xc, rows);
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

/// The same norm as burn ops (the fallback for another backend, and the tests' reference).
fn reference<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f32) -> Tensor<D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed * weight.clone().unsqueeze::<D>()
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use super::NORM_UNITS;
    use crate::graph::cube_reduce::cube_reduce;

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
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use crate::device::{AdapterChoice, Gpu};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    }

    /// The fused kernel equals burn's ops up to summation order: widths below, at and above the
    /// cube's units, a strided (sliced) input, and more rows than one launch dimension holds.
    #[test]
    fn fused_norm_matches_burn_ops() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        for (rows, width) in [(3, 5), (2, 64), (4, 200), (70_000, 3)] {
            let x = Tensor::<2>::from_data(TensorData::new(random(rows * width, 1), [rows, width]), device);
            let w = Tensor::<1>::from_data(TensorData::new(random(width, 2), [width]), device);
            let got: Vec<f32> = super::rms_norm(x.clone(), &w, 1e-6).into_data().try_to_vec().unwrap();
            let want: Vec<f32> = super::reference(x, &w, 1e-6).into_data().try_to_vec().unwrap();
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "rows {rows} width {width}: max diff {diff}");
        }
        // A view of every other column block: strides the kernel must follow.
        let x = Tensor::<3>::from_data(TensorData::new(random(2 * 3 * 40, 3), [2, 3, 40]), device);
        let view = x.slice([0..2, 0..3, 8..40]);
        let w = Tensor::<1>::from_data(TensorData::new(random(32, 4), [32]), device);
        let got: Vec<f32> = super::rms_norm(view.clone(), &w, 1e-5).into_data().try_to_vec().unwrap();
        let want: Vec<f32> = super::reference(view, &w, 1e-5).into_data().try_to_vec().unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "sliced input: max diff {diff}");
    }

    /// The fused residual add returns exactly burn's sum and its norm, also for a strided
    /// residual and more rows than the cube has units.
    #[test]
    fn fused_add_and_norm_match_burn_ops() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        for (rows, width) in [(1, 5), (3, 200), (70, 64)] {
            let x = Tensor::<2>::from_data(TensorData::new(random(rows * 2 * width, 5), [rows, 2 * width]), device)
                .slice([0..rows, width..2 * width]);
            let y = Tensor::<2>::from_data(TensorData::new(random(rows * width, 6), [rows, width]), device);
            let w = Tensor::<1>::from_data(TensorData::new(random(width, 7), [width]), device);
            let (sum, normed) = super::add_rms_norm(x.clone(), y.clone(), 1, &w, 1e-6);
            let want_sum = x + y;
            let got: Vec<f32> = sum.into_data().try_to_vec().unwrap();
            let want: Vec<f32> = want_sum.clone().into_data().try_to_vec().unwrap();
            assert_eq!(got, want, "rows {rows} width {width}: the sum differs from burn's");
            let got: Vec<f32> = normed.into_data().try_to_vec().unwrap();
            let want: Vec<f32> = super::reference(want_sum, &w, 1e-6).into_data().try_to_vec().unwrap();
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "rows {rows} width {width}: max diff {diff}");
        }
        // Three parts per row (a MoE block's ranks): added in order, then to the residual.
        let (rows, parts, width) = (2, 3, 70);
        let xs = random(rows * width, 8);
        let ys = random(rows * parts * width, 9);
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [rows, width]), device);
        let y = Tensor::<2>::from_data(TensorData::new(ys.clone(), [rows * parts, width]), device);
        let w = Tensor::<1>::from_data(TensorData::new(random(width, 10), [width]), device);
        let (sum, _) = super::add_rms_norm(x, y, parts, &w, 1e-6);
        let got: Vec<f32> = sum.into_data().try_to_vec().unwrap();
        let want: Vec<f32> = (0..rows * width)
            .map(|i| {
                let (r, j) = (i / width, i % width);
                let part = |p: usize| ys[(r * parts + p) * width + j];
                xs[i] + (part(0) + part(1) + part(2))
            })
            .collect();
        assert_eq!(got, want, "parts are added in order, then to the residual");
    }
}
