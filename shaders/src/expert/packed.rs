//! The grouped expert FFN over quantised slots (`--expert-dtype int8|int4|int3|int2|mxfp4`): the
//! same launch shape as the f32 kernels (one unit per four adjacent output rows, or one where the
//! sizes do not divide by four, and group of assignments), reading packed codes one vector of
//! u32 words at a time and applying each group's scale once per `GROUP` products.
//!
//! Slot layout (see `format.rs`): gate and up codes `[slots, code_rows(hidden), intermediate]`
//! with scales `[slots, hidden / GROUP, intermediate]`; down codes
//! `[slots, code_rows(intermediate), hidden]` with scales `[slots, intermediate / GROUP, hidden]`.
//! Neighbouring units read neighbouring words. As in the f32 kernels, every sum runs in a fixed
//! order, so offloaded output equals all-resident output bit for bit.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Device, Tensor as BurnTensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::common::{ExpertExtras, Launch, Work, activate, group_at};
use crate::bridge::{ShaderError, cube_float};
use crate::format::{GROUP, QuantMatrix, code_rows};
use crate::lanes::{contiguous, input_lanes, load_vec};
use crate::panel::{PANEL, panel_at, panel_walk};
use crate::split::{combine, combine_pair};

/// The dot products of `N` adjacent packed columns with the contiguous row `v[v_base..]` over
/// the quantisation groups `first..end` of the reduction: one vector load of the `N` columns'
/// words per code word, one load of `v` per `M` inputs, codes unpacked word by word, each
/// group's partial sums scaled once. Each lane's sum runs in index order. `columns` is the
/// distance from one code row (or scale row) of the columns to the next: their panel's width.
#[cube]
#[allow(clippy::too_many_arguments)] // the same arguments as packed_dot
fn packed_dot<F: Float, N: Size, M: Size>(
    codes: &Tensor<Vector<u32, N>>,
    scales: &Tensor<Vector<F, N>>,
    code_base: usize,
    scale_base: usize,
    columns: usize,
    first: usize,
    end: usize,
    v: &Tensor<Vector<F, M>>,
    v_base: usize,
    #[comptime] bits: u32,
    #[comptime] fp4: bool,
) -> Vector<F, N> {
    let mut total = Vector::<F, N>::new(F::new(0.0));
    let zero = Vector::<F, N>::new(F::cast_from(comptime!(1u32 << (bits - 1))));
    let m = v.vector_size();
    if comptime!(bits == 3) {
        for q in first..end {
            let r = q * 3;
            let high = codes[code_base + (r + 2) * columns];
            let v_group = (v_base + q * comptime!(GROUP)) / m;
            let mut part = Vector::<F, N>::new(F::new(0.0));
            #[unroll]
            for half in 0..2u32 {
                let low = codes[code_base + (r + half as usize) * columns];
                #[unroll]
                for l in 0..comptime!(16 / m) {
                    let xv = v[v_group + comptime!(half as usize * 16 / m) + l];
                    #[unroll]
                    for c in 0..m {
                        let b = comptime!((l * m + c) as u32);
                        let at = comptime!(half * 16 + b);
                        let code = ((low >> Vector::new(comptime!(2 * b))) & Vector::new(3))
                            | (((high >> Vector::new(at)) & Vector::new(1)) << Vector::new(2));
                        part += (Vector::<F, N>::cast_from(code) - zero) * Vector::<F, N>::new(xv.extract(c));
                    }
                }
            }
            total += part * scales[scale_base + q * columns];
        }
    } else {
        let per_word = comptime!((32 / bits) as usize);
        let words_per_group = comptime!(GROUP / per_word);
        let mask = Vector::<u32, N>::new(comptime!((1u32 << bits) - 1));
        for q in first..end {
            let mut part = Vector::<F, N>::new(F::new(0.0));
            for w in 0..words_per_group {
                let r = q * words_per_group + w;
                let word = codes[code_base + r * columns];
                let at = (v_base + r * per_word) / m;
                #[unroll]
                for l in 0..comptime!(per_word / m) {
                    let xv = v[at + l];
                    #[unroll]
                    for c in 0..m {
                        let b = comptime!((l * m + c) as u32);
                        let code = (word >> Vector::new(comptime!(b * bits))) & mask;
                        let weight =
                            if fp4 { e2m1_twice::<F, N>(code) } else { Vector::<F, N>::cast_from(code) - zero };
                        part += weight * Vector::<F, N>::new(xv.extract(c));
                    }
                }
            }
            total += part * scales[scale_base + q * columns];
        }
    }
    total
}

/// Twice an e2m1 code's value (see `format::e2m1_twice`) on every lane, without branches: `((2 + m) << e) >> 1` is `(2 + m) << (e - 1)`
/// for `e > 0`; for `e = 0` it is 1, so `1 - m` is taken off there; bit 3 is the sign.
#[cube]
fn e2m1_twice<F: Float, N: Size>(code: Vector<u32, N>) -> Vector<F, N> {
    let one = Vector::<u32, N>::new(1);
    let e = (code >> one) & Vector::new(3);
    let m = code & one;
    let normal = ((Vector::<u32, N>::new(2) + m) << e) >> one;
    let subnormal_fix = (one - m) * (one - min(e, one));
    let magnitude = Vector::<F, N>::cast_from(normal - subnormal_fix);
    let sign = Vector::<F, N>::cast_from(code >> Vector::new(3));
    magnitude - Vector::<F, N>::new(F::new(2.0)) * sign * magnitude
}

/// `act[o, i] = act(gate_i · x_t, up_i · x_t)` over quantised slots, `N` adjacent intermediate
/// rows per unit.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_quant_kernel<F: Float, I: Numeric, N: Size, M: Size>(
    x: &Tensor<Vector<F, M>>, // [tokens, hidden], contiguous
    gate: &Tensor<Vector<u32, N>>,
    gate_scales: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<u32, N>>,
    up_scales: &Tensor<Vector<F, N>>,
    groups: &Tensor<I>,
    assign: &Tensor<I>,
    act: &mut Tensor<Vector<F, N>>,
    bias: &Tensor<F>,
    params: &Tensor<F>,
    chunk: u32, // quantisation groups per chunk
    #[comptime] ways: u32,
    #[comptime] bits: u32,
    #[comptime] fp4: bool,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let lanes = gate.vector_size();
    let words = gate.shape(1);
    let row = gate.shape(2) / lanes;
    let n_scales = gate_scales.shape(1);
    let i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = i < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    // Codes and scales lie in panels of the same columns; one step walks both.
    let (code_first, step) = panel_walk(i, row, words, PANEL / lanes);
    let (scale_first, _) = panel_walk(i, row, n_scales, PANEL / lanes);
    let code_base = group.slot * words * row + code_first;
    let scale_base = group.slot * n_scales * row + scale_first;
    let first = min(UNIT_POS_Y as usize * chunk as usize, n_scales);
    let end = min(first + chunk as usize, n_scales);
    for a in group.start..group.end {
        let t = usize::cast_from(assign[a * 2]);
        let o = usize::cast_from(assign[a * 2 + 1]);
        let x_base = t * x.shape(1);
        let mut gs = Vector::<F, N>::new(F::new(0.0));
        let mut us = Vector::<F, N>::new(F::new(0.0));
        if live {
            gs =
                packed_dot::<F, N, M>(gate, gate_scales, code_base, scale_base, step, first, end, x, x_base, bits, fp4);
            us = packed_dot::<F, N, M>(up, up_scales, code_base, scale_base, step, first, end, x, x_base, bits, fp4);
        }
        let (gs, us) = combine_pair::<F, N>(gs, us, ways);
        if live && UNIT_POS_Y == 0 {
            let inter = row * lanes;
            let at = group.expert * 2 * inter + i * lanes;
            act[o * row + i] = activate::<F, N>(gs, us, bias, params, at, inter, has_bias, clamped);
        }
    }
}

/// `y[o, h] = w_a * (down_h · act[o] + b_h)` over quantised slots, `N` adjacent hidden rows per
/// unit.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_quant_kernel<F: Float, I: Numeric, N: Size, M: Size>(
    act: &Tensor<Vector<F, M>>,
    down: &Tensor<Vector<u32, N>>,
    down_scales: &Tensor<Vector<F, N>>,
    groups: &Tensor<I>,
    assign: &Tensor<I>,
    weights: &Tensor<F>,
    y: &mut Tensor<Vector<F, N>>,
    bias: &Tensor<F>,
    chunk: u32, // quantisation groups per chunk
    #[comptime] ways: u32,
    #[comptime] bits: u32,
    #[comptime] fp4: bool,
    #[comptime] has_bias: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let lanes = down.vector_size();
    let words = down.shape(1);
    let row = down.shape(2) / lanes;
    let n_scales = down_scales.shape(1);
    let inter = act.shape(1);
    let h = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = h < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    // Codes and scales lie in panels of the same columns; one step walks both.
    let (code_first, step) = panel_walk(h, row, words, PANEL / lanes);
    let (scale_first, _) = panel_walk(h, row, n_scales, PANEL / lanes);
    let code_base = group.slot * words * row + code_first;
    let scale_base = group.slot * n_scales * row + scale_first;
    let first = min(UNIT_POS_Y as usize * chunk as usize, n_scales);
    let end = min(first + chunk as usize, n_scales);
    for a in group.start..group.end {
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        if live {
            s = packed_dot::<F, N, M>(
                down,
                down_scales,
                code_base,
                scale_base,
                step,
                first,
                end,
                act,
                o * inter,
                bits,
                fp4,
            );
        }
        s = combine::<F, N>(s, ways);
        if live && UNIT_POS_Y == 0 {
            if has_bias {
                s += load_vec::<F, N>(bias, group.expert * row * lanes + h * lanes);
            }
            y[o * row + h] = s * Vector::<F, N>::new(weights[a]);
        }
    }
}

/// Copies `src` (`[rows, cols]` row-major) into slot `slot` of `dst` (`[slots, rows, cols]`), in
/// panels (an expert's codes into its slot).
#[cube(launch)]
fn copy_codes_kernel(src: &Tensor<u32>, dst: &mut Tensor<u32>, slot: u32) {
    let pos = ABSOLUTE_POS;
    if pos >= src.len() {
        terminate!();
    }
    let (rows, cols) = (dst.shape(1), dst.shape(2));
    dst[slot as usize * rows * cols + panel_at(pos / cols, pos % cols, rows, cols)] = src[pos];
}

/// `copy_codes_kernel` for an expert's scales.
#[cube(launch)]
fn copy_scales_kernel<F: Float>(src: &Tensor<F>, dst: &mut Tensor<F>, slot: u32, #[define(F)] _dtype: ElemType) {
    let pos = ABSOLUTE_POS;
    if pos >= src.len() {
        terminate!();
    }
    let (rows, cols) = (dst.shape(1), dst.shape(2));
    dst[slot as usize * rows * cols + panel_at(pos / cols, pos % cols, rows, cols)] = src[pos];
}

/// One projection of a page of quantised slots.
struct Packed {
    codes: CubeTensor,
    scales: CubeTensor,
}

impl Packed {
    /// `k` reduction rows by `n` columns per slot.
    fn new(like: &CubeTensor, slots: usize, k: usize, n: usize, bits: u32) -> Self {
        let empty = |shape: [usize; 3], dtype: DType| {
            burn_cubecl::ops::numeric::empty_device_dtype(like.client.clone(), like.device.clone(), shape.into(), dtype)
        };
        Self {
            codes: empty([slots, code_rows(k, bits), n], DType::U32),
            scales: empty([slots, k / GROUP, n], like.dtype),
        }
    }

    fn store(&self, slot: usize, m: &QuantMatrix, device: &Device) -> Result<(), ShaderError> {
        let client = self.codes.client.clone();
        let handle = client.create_from_slice(bytemuck::cast_slice(&m.words));
        let codes = CubeTensor::new_contiguous(
            client.clone(),
            self.codes.device.clone(),
            [m.words.len()].into(),
            handle,
            DType::U32,
        );
        let scales =
            cube_float(BurnTensor::<1>::from_data(TensorData::new(m.scales.clone(), [m.scales.len()]), device))?;
        let launch = |elems: usize| {
            let dim = CubeDim::new(&client, elems);
            (calculate_cube_count_elemwise(&client, elems, dim), dim)
        };
        let (count, dim) = launch(m.words.len());
        crate::launches::record(&count, &dim);
        copy_codes_kernel::launch(
            &client,
            count,
            dim,
            codes.into_tensor_arg(),
            self.codes.clone().into_tensor_arg(),
            slot as u32,
        );
        let (count, dim) = launch(m.scales.len());
        let dtype = dtype_to_storage_type(scales.dtype);
        crate::launches::record(&count, &dim);
        copy_scales_kernel::launch(
            &client,
            count,
            dim,
            scales.into_tensor_arg(),
            self.scales.clone().into_tensor_arg(),
            slot as u32,
            dtype,
        );
        Ok(())
    }
}

/// A page of quantised expert slots: packed codes and scales per projection.
pub struct PackedPage {
    bits: u32,
    fp4: bool,
    gate: Packed,
    up: Packed,
    down: Packed,
}

impl PackedPage {
    /// A page of `slots` experts of `bits`-bit codes, e2m1 (MXFP4) with `fp4`, else integers.
    pub fn new(like: &CubeTensor, slots: usize, hidden: usize, inter: usize, bits: u32, fp4: bool) -> Self {
        Self {
            bits,
            fp4,
            gate: Packed::new(like, slots, hidden, inter, bits),
            up: Packed::new(like, slots, hidden, inter, bits),
            down: Packed::new(like, slots, inter, hidden, bits),
        }
    }

    /// Queues the copy of an expert's packed gate, up and down into `slot`.
    pub fn store(&self, slot: usize, [gate, up, down]: [&QuantMatrix; 3], device: &Device) -> Result<(), ShaderError> {
        self.gate.store(slot, gate, device)?;
        self.up.store(slot, up, device)?;
        self.down.store(slot, down, device)
    }

    /// Queues the grouped SwiGLU of `work` over this page, as `FloatPage::swiglu`.
    #[allow(clippy::too_many_arguments)] // the kernel's buffers, passed through as they are
    pub fn swiglu(
        &self,
        x: &CubeTensor,
        work: Work<'_>,
        extras: &ExpertExtras,
        act: &CubeTensor,
        y: &CubeTensor,
        device: &Device,
    ) -> Result<(), ShaderError> {
        let (inter, hidden) = (self.gate.codes.meta.shape()[2], self.down.codes.meta.shape()[2]);
        let Some(launch) = Launch::new(work, extras, device, hidden, inter)? else { return Ok(()) };
        let x = &contiguous(x);
        let client = x.client.clone();
        let dtypes = [dtype_to_storage_type(x.dtype), dtype_to_storage_type(launch.groups.dtype)];
        let lanes = launch.lanes;
        let shape = launch.shape(hidden, GROUP);
        launch.record(inter / lanes, &shape, &[&self.gate.codes, &self.gate.scales, &self.up.codes, &self.up.scales]);
        gate_up_quant_kernel::launch(
            &client,
            launch.cubes(inter / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(hidden),
            x.clone().into_tensor_arg(),
            self.gate.codes.clone().into_tensor_arg(),
            self.gate.scales.clone().into_tensor_arg(),
            self.up.codes.clone().into_tensor_arg(),
            self.up.scales.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            act.clone().into_tensor_arg(),
            launch.bias_gate_up.clone().into_tensor_arg(),
            launch.extras.params.clone().into_tensor_arg(),
            shape.chunk,
            shape.ways,
            self.bits,
            self.fp4,
            launch.has_bias,
            launch.extras.clamped,
            dtypes,
        );
        let shape = launch.shape(inter, GROUP);
        launch.record(hidden / lanes, &shape, &[&self.down.codes, &self.down.scales]);
        down_quant_kernel::launch(
            &client,
            launch.cubes(hidden / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(inter),
            act.clone().into_tensor_arg(),
            self.down.codes.clone().into_tensor_arg(),
            self.down.scales.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            launch.weights.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            launch.bias_down.clone().into_tensor_arg(),
            shape.chunk,
            shape.ways,
            self.bits,
            self.fp4,
            launch.has_bias,
            dtypes,
        );
        Ok(())
    }
}
