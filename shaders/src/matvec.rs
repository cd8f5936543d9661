//! The decode-shaped product: one row of activations times a weight matrix kept as `[in, out]`,
//! in plain rows or in panels (`crate::panel`).
//!
//! A decode step multiplies a single row by every projection and by the LM head. burn's tiled
//! matmul is built for many rows; for one it was 1.4x to 4.6x slower than this kernel on lavapipe
//! (BENCHMARKS.md). Each unit owns `N` adjacent outputs and one chunk of the input dimension
//! (`split`: the whole of it on a CPU adapter), with one vector load per weight row, so
//! neighbouring units read neighbouring addresses and the weights are read exactly once, as in
//! the grouped expert kernels.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeCount;

use crate::bridge::{from_cube, try_cube_float};
use crate::lanes::{contiguous, input_lanes};
use crate::launches;
use crate::panel::Layout;
use crate::split::{Shape, Split};

/// Rows up to which the kernel is used (each row reads the weights again); more rows go to
/// burn's matmul.
pub const MAX_ROWS: usize = 1;

/// What both products launch with: `x` and `bias` as CubeCL tensors (None where the backend is
/// another), the output `[rows, outputs]`, the vector size and the cube count.
struct Prepared {
    x: CubeTensor,
    bias: Option<CubeTensor>,
    y: CubeTensor,
    lanes: usize,
    count: CubeCount,
    shape: Shape,
}

/// `per_step`: 1 for f32 weights, 2 for bf16 pairs (chunks counted in pairs, on the f32 kernel's
/// boundaries).
fn prepare(x: &Tensor<2>, bias: Option<&Tensor<1>>, outputs: usize, split: Split, per_step: usize) -> Option<Prepared> {
    let rows = x.dims()[0];
    let xc = contiguous(&try_cube_float(x.clone()).ok()?);
    let bias = match bias {
        Some(b) => Some(try_cube_float(b.clone()).ok()?),
        None => None,
    };
    let y = burn_cubecl::ops::numeric::empty_device_dtype(
        xc.client.clone(),
        xc.device.clone(),
        [rows, outputs].into(),
        xc.dtype,
    );
    let lanes = if outputs.is_multiple_of(4) { 4 } else { 1 };
    let shape = split.shape(x.dims()[1], per_step);
    let count = CubeCount::Static(((outputs / lanes) as u32).div_ceil(shape.dim.x), rows as u32, 1);
    Some(Prepared { x: xc, bias, y, lanes, count, shape })
}

/// `x W` for `x` `[rows, in]` (any strides) and `wt` `[in, out]` (contiguous), plus `bias`
/// `[out]`, each dot product split as `split` says; None where the tensors are not on a CubeCL
/// backend (the caller then runs a matmul).
pub fn matvec(
    x: &Tensor<2>,
    wt: &CubeTensor,
    bias: Option<&Tensor<1>>,
    split: Split,
    layout: Layout,
) -> Option<Tensor<2>> {
    let (w_in, outputs) = (wt.meta.shape()[0], wt.meta.shape()[1]);
    debug_assert_eq!(x.dims()[1], w_in, "matvec: x has {} columns, the weight {w_in} rows", x.dims()[1]);
    let Prepared { x: xc, bias, y, lanes, count, shape } = prepare(x, bias, outputs, split, 1)?;
    let has_bias = bias.is_some();
    let dtypes = [dtype_to_storage_type(xc.dtype), dtype_to_storage_type(wt.dtype)];
    let bytes = (w_in * outputs * wt.dtype.size()) as u64;
    launches::record_matrix(&count, &shape.dim, bytes);
    kernel::matvec_kernel::launch(
        &xc.client.clone(),
        count,
        shape.dim,
        lanes,
        input_lanes(w_in),
        xc.clone().into_tensor_arg(),
        wt.clone().into_tensor_arg(),
        bias.unwrap_or(xc).into_tensor_arg(),
        y.clone().into_tensor_arg(),
        shape.chunk,
        layout.width(outputs, lanes),
        shape.ways,
        has_bias,
        dtypes,
    );
    Some(from_cube(y))
}

/// `x W` for bf16 pairs `words` `[in / 2, out]` (see `pairs`), as `matvec`: each lane adds
/// `w_j x_j` then `w_(j+1) x_(j+1)` in index order, so a BF16 checkpoint's projection gives
/// the f32 kernel's output bit for bit.
pub fn matvec_bf16(
    x: &Tensor<2>,
    words: &CubeTensor,
    bias: Option<&Tensor<1>>,
    split: Split,
    layout: Layout,
) -> Option<Tensor<2>> {
    let (pairs, outputs) = (words.meta.shape()[0], words.meta.shape()[1]);
    debug_assert_eq!(x.dims()[1], 2 * pairs, "matvec_bf16: x has {} columns, the weight {pairs} pairs", x.dims()[1]);
    let Prepared { x: xc, bias, y, lanes, count, shape } = prepare(x, bias, outputs, split, 2)?;
    let has_bias = bias.is_some();
    let dtype = dtype_to_storage_type(xc.dtype);
    launches::record_matrix(&count, &shape.dim, (pairs * outputs * 4) as u64);
    kernel::matvec_bf16_kernel::launch(
        &xc.client.clone(),
        count,
        shape.dim,
        lanes,
        input_lanes(2 * pairs).max(2),
        xc.clone().into_tensor_arg(),
        words.clone().into_tensor_arg(),
        bias.unwrap_or(xc).into_tensor_arg(),
        y.clone().into_tensor_arg(),
        shape.chunk,
        layout.width(outputs, lanes),
        shape.ways,
        has_bias,
        dtype,
    );
    Some(from_cube(y))
}

/// The kernels, apart so that their `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use crate::lanes::{dot, dot_pairs, load_vec};
    use crate::panel::panel_walk;
    use crate::split::combine;

    /// `y[r, c..c+N] = sum_j x[r, j] * wt[j, c..c+N] (+ bias)`: one unit per `N` adjacent
    /// outputs and chunk of `chunk` inputs, one cube row per input row; each lane sums its chunk
    /// in index order and `combine` adds the chunks in order.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and switches, passed through
    pub(super) fn matvec_kernel<F: Float, W: Float, N: Size, M: Size>(
        x: &Tensor<Vector<F, M>>,     // [rows, in], contiguous
        wt: &Tensor<Vector<W, N>>,    // [in, out]
        bias: &Tensor<F>,             // [out] (when has_bias)
        y: &mut Tensor<Vector<F, N>>, // [rows, out]
        chunk: u32,
        panel: u32, // panel width in vectors (`wt`'s whole width for plain rows)
        #[comptime] ways: u32,
        #[comptime] has_bias: bool,
        #[define(F, W)] _dtypes: [ElemType; 2],
    ) {
        let lanes = wt.vector_size();
        let cols = wt.shape(1) / lanes;
        let c = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
        let live = c < cols;
        let r = CUBE_POS_Y as usize;
        let inputs = wt.shape(0);
        let start = min(UNIT_POS_Y as usize * chunk as usize, inputs);
        let end = min(start + chunk as usize, inputs);
        let (first, step) = panel_walk(c, cols, inputs, panel as usize);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        if live {
            s = dot::<F, W, N, M>(wt, first + start * step, step, x, r * inputs, start, end);
        }
        s = combine::<F, N>(s, ways);
        if live && UNIT_POS_Y == 0 {
            if has_bias {
                s += load_vec::<F, N>(bias, c * lanes);
            }
            y[r * cols + c] = s;
        }
    }

    /// `matvec_kernel` over bf16 pairs `[in / 2, out]`, chunks of `chunk` pairs.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and switches, passed through
    pub(super) fn matvec_bf16_kernel<F: Float, N: Size, M: Size>(
        x: &Tensor<Vector<F, M>>,       // [rows, in], contiguous; M even
        words: &Tensor<Vector<u32, N>>, // [in / 2, out]
        bias: &Tensor<F>,               // [out] (when has_bias)
        y: &mut Tensor<Vector<F, N>>,   // [rows, out]
        chunk: u32,
        panel: u32, // panel width in vectors (`words`' whole width for plain rows)
        #[comptime] ways: u32,
        #[comptime] has_bias: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let lanes = words.vector_size();
        let cols = words.shape(1) / lanes;
        let c = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
        let live = c < cols;
        let r = CUBE_POS_Y as usize;
        let pairs = words.shape(0);
        let start = min(UNIT_POS_Y as usize * chunk as usize, pairs);
        let end = min(start + chunk as usize, pairs);
        let (first, step) = panel_walk(c, cols, pairs, panel as usize);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        if live {
            s = dot_pairs::<F, N, M>(words, first + start * step, step, x, r * 2 * pairs, start, end);
        }
        s = combine::<F, N>(s, ways);
        if live && UNIT_POS_Y == 0 {
            if has_bias {
                s += load_vec::<F, N>(bias, c * lanes);
            }
            y[r * cols + c] = s;
        }
    }
}

/// `x W (+ bias)` on the host: `x` `[rows, in]`, `wt` `[in, out]`, each output summed as the
/// kernel sums it split `ways` ways (chunks in index order, then the chunks in order).
pub fn reference(x: &[f32], wt: &[f32], bias: Option<&[f32]>, inputs: usize, outputs: usize, ways: u32) -> Vec<f32> {
    let chunk = Split::chunk(inputs, ways, crate::split::ALIGN);
    x.chunks_exact(inputs)
        .flat_map(|row| {
            (0..outputs).map(move |c| {
                let dot = crate::split::reference_sum(inputs, chunk, |j| row[j] * wt[j * outputs + c]);
                dot + bias.map_or(0.0, |b| b[c])
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use burn_cubecl::tensor::CubeTensor;

    use crate::bridge::{cube_float, from_cube};
    use crate::panel::{Layout, to_panels};
    use crate::split::Split;
    use crate::testing::{device, random};

    /// Outputs divisible by four and not, with and without a bias, a strided (sliced) input row,
    /// two rows, f16 weights, and dot products whole and split into chunks (up to 32 ways): the
    /// kernel equals `reference` (on the weights rounded to f16 for f16) up to rounding.
    #[test]
    fn matvec_matches_the_cpu_reference() {
        for split in [Split::WHOLE, Split::GPU, Split::at_most(4).unwrap()] {
            check_matvec(split);
        }
    }

    fn check_matvec(split: Split) {
        let device = &device();
        let cases = [
            (1, 64, 96, false, false),
            (1, 40, 30, true, false),
            (2, 130, 8, true, false),
            (1, 5, 3, false, false),
            (1, 64, 96, true, true),
            (1, 9, 7, false, true),
            (1, 1030, 12, true, false),
            (1, 300, 16, false, true),
            // Two full panels and a narrower last one, by fours and by ones.
            (1, 48, 100, true, false),
            (1, 40, 70, false, false),
        ];
        for (rows, inputs, outputs, bias, f16) in cases {
            let mut wt = random(inputs * outputs, 1, 1.0);
            if f16 {
                wt.iter_mut().for_each(|w| *w = half::f16::from_f32(*w).to_f32());
            }
            let b = random(outputs, 2, 1.0);
            // The rows are every other column block of a wider tensor: strides to follow.
            let wide = random(rows * 2 * inputs, 3, 1.0);
            let x = Tensor::<2>::from_data(TensorData::new(wide.clone(), [rows, 2 * inputs]), device)
                .slice([0..rows, inputs..2 * inputs]);
            let wt_tensor = Tensor::<2>::from_data(TensorData::new(wt.clone(), [inputs, outputs]), device);
            let wt_gpu =
                cube_float(if f16 { wt_tensor.cast(burn::tensor::FloatDType::F16) } else { wt_tensor }).unwrap();
            assert_eq!(wt_gpu.dtype == burn::tensor::DType::F16, f16);
            let b_gpu = Tensor::<1>::from_data(TensorData::new(b.clone(), [outputs]), device);
            let got = super::matvec(&x, &wt_gpu, bias.then_some(&b_gpu), split, Layout::Rows).expect("CubeCL backend");
            assert_eq!(got.dims(), [rows, outputs]);
            let got: Vec<f32> = got.into_data().try_to_vec().unwrap();
            // The same weights in panels: the same bits.
            let panelled = cube_float(to_panels(from_cube(wt_gpu.clone())).unwrap()).unwrap();
            let from_panels = super::matvec(&x, &panelled, bias.then_some(&b_gpu), split, Layout::Panels).unwrap();
            let from_panels: Vec<f32> = from_panels.into_data().try_to_vec().unwrap();
            assert_eq!(from_panels, got, "{rows}x{inputs}x{outputs} f16 {f16} {split:?}: panels against rows");
            let xs: Vec<f32> = (0..rows).flat_map(|r| wide[r * 2 * inputs + inputs..][..inputs].to_vec()).collect();
            let want = super::reference(&xs, &wt, bias.then_some(&b[..]), inputs, outputs, split.ways(inputs));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{rows}x{inputs}x{outputs} f16 {f16} {split:?}: {g} vs {w}"
                );
            }
            // The same product over bf16 pairs of bf16 values equals the f32 kernel bit for bit.
            if inputs.is_multiple_of(2) && !f16 {
                let rounded: Vec<f32> = wt.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
                let wt_f32 = Tensor::<2>::from_data(TensorData::new(rounded, [inputs, outputs]), device);
                let words = cube_float(crate::pairs::pack(wt_f32.clone()).unwrap()).unwrap();
                let product = |w: &CubeTensor, layout| super::matvec_bf16(&x, w, bias.then_some(&b_gpu), split, layout);
                let from_pairs = product(&words, Layout::Rows).expect("CubeCL backend");
                let panelled = cube_float(to_panels(from_cube(words.clone())).unwrap()).unwrap();
                let from_panelled_pairs = product(&panelled, Layout::Panels).unwrap();
                let from_f32 =
                    super::matvec(&x, &cube_float(wt_f32).unwrap(), bias.then_some(&b_gpu), split, Layout::Rows)
                        .unwrap();
                let values = |t: Tensor<2>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
                let (a, b) = (values(from_pairs), values(from_f32));
                assert_eq!(a, b, "{rows}x{inputs}x{outputs} {split:?}: bf16 pairs against f32");
                let c = values(from_panelled_pairs);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&c), bits(&a), "{rows}x{inputs}x{outputs} {split:?}: panelled pairs");
            }
        }
    }
}
