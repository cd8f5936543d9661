//! The grouped expert FFN over f32 or f16 slots: gate/up, then down, one unit per four
//! adjacent output rows (or one, where the sizes do not divide by four), chunk of the reduction
//! and group of assignments; the slot element type is a kernel generic, so f16 slots load half
//! precision and sum in f32.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Device, Tensor as BurnTensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::common::{ExpertExtras, Launch, Work, activate, group_at};
use crate::bridge::{ShaderError, cube_float};
use crate::lanes::{contiguous, dot, input_lanes, load_vec};
use crate::panel::{PANEL, panel_at, panel_walk};
use crate::split::{combine, combine_pair};

/// `act[o, i] = act(gate_i · x_t, up_i · x_t)` for every assignment `(t, o)` of every group;
/// one unit per `N` adjacent intermediate rows `i` and group, one vector load per weight row.
/// Each lane's dot product runs in index order, whatever `N`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_kernel<F: Float, W: Float, I: Numeric, N: Size, M: Size>(
    x: &Tensor<Vector<F, M>>,       // [tokens, hidden], contiguous
    gate: &Tensor<Vector<W, N>>,    // [slots, hidden, intermediate] (f32 or f16; sums in F)
    up: &Tensor<Vector<W, N>>,      // [slots, hidden, intermediate]
    groups: &Tensor<I>,             // [groups * 4]: slot, first assignment, end, expert
    assign: &Tensor<I>,             // [assignments * 2]: token, output row
    act: &mut Tensor<Vector<F, N>>, // [rows, intermediate]
    bias: &Tensor<F>,               // [experts, 2 * intermediate]: gate then up biases (when has_bias)
    params: &Tensor<F>,             // [limit, alpha] (when clamped)
    act_offset: u32,                // this part's first intermediate row, in vectors
    act_row: u32,                   // the whole intermediate size, in vectors
    chunk: u32,                     // hidden inputs per chunk
    #[comptime] ways: u32,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
    #[define(F, W, I)] _dtypes: [ElemType; 3],
) {
    let lanes = gate.vector_size();
    let hidden = gate.shape(1);
    let row = gate.shape(2) / lanes;
    let i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = i < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let (first, step) = panel_walk(i, row, hidden, PANEL / lanes);
    let base = group.slot * hidden * row + first;
    let start = min(UNIT_POS_Y as usize * chunk as usize, hidden);
    let end = min(start + chunk as usize, hidden);
    let xm = x.vector_size();
    let inter = act_row as usize * lanes;
    let out = act_offset as usize + i;
    for a in group.start..group.end {
        let t = usize::cast_from(assign[a * 2]);
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut gs = Vector::<F, N>::new(F::new(0.0));
        let mut us = Vector::<F, N>::new(F::new(0.0));
        if live {
            let mut at = base + start * step;
            let mut j = start;
            while j < end {
                // One load of x serves `xm` weight rows: on lavapipe each load is a loop over
                // the batch's lanes, so x's loads cost as much as the weights' otherwise.
                let xv = x[(t * hidden + j) / xm];
                #[unroll]
                for l in 0..xm {
                    let xs = Vector::<F, N>::new(xv.extract(l));
                    gs += Vector::<F, N>::cast_from(gate[at]) * xs;
                    us += Vector::<F, N>::cast_from(up[at]) * xs;
                    at += step;
                }
                j += xm;
            }
        }
        let (gs, us) = combine_pair::<F, N>(gs, us, ways);
        if live && UNIT_POS_Y == 0 {
            let at = group.expert * 2 * inter + out * lanes;
            act[o * act_row as usize + out] = activate::<F, N>(gs, us, bias, params, at, inter, has_bias, clamped);
        }
    }
}

/// `y[o, h] = w_a * (down_h · act[o] + b_h)` for every assignment (the bias when `has_bias`);
/// one unit per `N` adjacent hidden rows and group.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_kernel<F: Float, W: Float, I: Numeric, N: Size, M: Size>(
    act: &Tensor<Vector<F, M>>,   // [rows, intermediate]
    down: &Tensor<Vector<W, N>>,  // [slots, intermediate, hidden]
    groups: &Tensor<I>,           // [groups * 4]
    assign: &Tensor<I>,           // [assignments * 2]
    weights: &Tensor<F>,          // [assignments]
    y: &mut Tensor<Vector<F, N>>, // [rows, hidden]
    bias: &Tensor<F>,             // [experts, hidden] (when has_bias)
    y_offset: u32,                // this part's first hidden row, in vectors
    y_row: u32,                   // the whole hidden size, in vectors
    chunk: u32,                   // intermediate inputs per chunk
    #[comptime] ways: u32,
    #[comptime] has_bias: bool,
    #[define(F, W, I)] _dtypes: [ElemType; 3],
) {
    let lanes = down.vector_size();
    let inter = down.shape(1);
    let row = down.shape(2) / lanes;
    let h = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = h < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let (first, step) = panel_walk(h, row, inter, PANEL / lanes);
    let base = group.slot * inter * row + first;
    let start = min(UNIT_POS_Y as usize * chunk as usize, inter);
    let end = min(start + chunk as usize, inter);
    let out = y_offset as usize + h;
    for a in group.start..group.end {
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        if live {
            s = dot::<F, W, N, M>(down, base + start * step, step, act, o * inter, start, end);
        }
        s = combine::<F, N>(s, ways);
        if live && UNIT_POS_Y == 0 {
            if has_bias {
                s += load_vec::<F, N>(bias, group.expert * y_row as usize * lanes + out * lanes);
            }
            y[o * y_row as usize + out] = s * Vector::<F, N>::new(weights[a]);
        }
    }
}

/// Writes one expert (checkpoint layout: gate, up `[intermediate, hidden]`, down
/// `[hidden, intermediate]`), or one part of it (some of the gate/up rows and as many of the down
/// rows), into slot `slot` of a page, transposing into panels on the way.
#[cube(launch)]
fn store_slot_kernel<F: Float, W: Float>(
    gate_src: &Tensor<F>,
    up_src: &Tensor<F>,
    down_src: &Tensor<F>,
    gate: &mut Tensor<W>,
    up: &mut Tensor<W>,
    down: &mut Tensor<W>,
    slot: u32,
    #[define(F, W)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= gate_src.len() {
        terminate!();
    }
    let hidden = gate.shape(1);
    let inter = gate.shape(2);
    let base = slot as usize * hidden * inter;
    let r = pos / hidden;
    let c = pos % hidden;
    let at = base + panel_at(c, r, hidden, inter);
    gate[at] = W::cast_from(gate_src[pos]);
    up[at] = W::cast_from(up_src[pos]);
    // A part of a split expert holds some of the down rows: its own shape, the same size.
    let down_inter = down.shape(1);
    let down_hidden = down.shape(2);
    let hr = pos / down_inter;
    let ic = pos % down_inter;
    down[base + panel_at(ic, hr, down_inter, down_hidden)] = W::cast_from(down_src[pos]);
}

/// A page of f32 or f16 expert slots: one buffer per projection, or, where one projection is
/// larger than a binding, `parts` buffers per projection, each holding the same share of every
/// slot's output rows (gate/up: intermediate rows; down: hidden rows). A row's dot product stays
/// whole in one part, so a split page computes the same bits as an unsplit one.
pub struct FloatPage {
    parts: Vec<Part>,
    hidden: usize,
    inter: usize,
}

/// One part's buffers: gate, up `[slots, hidden, inter / parts]`, down `[slots, inter, hidden /
/// parts]`.
struct Part {
    gate: CubeTensor,
    up: CubeTensor,
    down: CubeTensor,
}

impl FloatPage {
    /// Allocates `slots` experts on `like`'s device, uninitialised: f16 with `half`, else in
    /// `like`'s float type.
    pub fn new(like: &CubeTensor, slots: usize, hidden: usize, inter: usize, half: bool) -> Self {
        Self::split(like, slots, hidden, inter, half, 1)
    }

    /// As `new`, each projection in `parts` buffers of its output rows (`parts` divides both
    /// `hidden` and `inter`).
    pub fn split(like: &CubeTensor, slots: usize, hidden: usize, inter: usize, half: bool, parts: usize) -> Self {
        assert!(hidden.is_multiple_of(parts) && inter.is_multiple_of(parts), "{parts} parts of {hidden} x {inter}");
        let element = if half { DType::F16 } else { like.dtype };
        let make = |shape: [usize; 3]| {
            burn_cubecl::ops::numeric::empty_device_dtype(
                like.client.clone(),
                like.device.clone(),
                shape.into(),
                element,
            )
        };
        let parts = (0..parts)
            .map(|_| Part {
                gate: make([slots, hidden, inter / parts]),
                up: make([slots, hidden, inter / parts]),
                down: make([slots, inter, hidden / parts]),
            })
            .collect();
        Self { parts, hidden, inter }
    }

    /// Uploads an expert (checkpoint layout: gate, up `[intermediate, hidden]`, down
    /// `[hidden, intermediate]`) and queues its copy into `slot`. Kernels queued earlier that
    /// read the slot's previous expert run first: the copy is ordered behind them on the same
    /// stream.
    pub fn store(&self, slot: usize, [g, u, d]: [Vec<f32>; 3], device: &Device) -> Result<(), ShaderError> {
        let (hidden, inter, n) = (self.hidden, self.inter, self.parts.len());
        // Part p: gate and up rows p * inter / n.., down rows p * hidden / n..; each a
        // contiguous run of the checkpoint layout.
        for (p, part) in self.parts.iter().enumerate() {
            let rows = |v: &[f32], width: usize, count: usize| v[p * count * width..(p + 1) * count * width].to_vec();
            let weights = [rows(&g, hidden, inter / n), rows(&u, hidden, inter / n), rows(&d, inter, hidden / n)];
            part.store(slot, weights, device)?;
        }
        Ok(())
    }

    /// Queues the copy into `slot` of an expert already on the device: `sources` are its gate,
    /// up and down in checkpoint layout as f32 (each `hidden * inter` values, any shape). Only
    /// for an unsplit page; ordered behind kernels queued earlier, as `store`.
    pub fn store_device(&self, slot: usize, sources: [CubeTensor; 3]) -> Result<(), ShaderError> {
        let n = self.hidden * self.inter;
        match &self.parts[..] {
            [part] if sources.iter().all(|t| t.meta.shape().num_elements() == n && t.dtype == DType::F32) => {
                part.copy_in(slot, sources);
                Ok(())
            }
            _ => Err(ShaderError::Shape(format!(
                "a device copy into a page of {} parts from sources of {:?} values, {n} wanted",
                self.parts.len(),
                sources.each_ref().map(|t| t.meta.shape().num_elements())
            ))),
        }
    }

    /// Queues the grouped SwiGLU of `work` over this page: reads `x` `[tokens, hidden]`,
    /// writes `act` rows and the weighted expert outputs into `y` rows. Every part's gate/up
    /// runs before any part's down, which reads whole `act` rows.
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
        let n = self.parts.len();
        let (hidden, inter) = (self.hidden, self.inter);
        let Some(launch) = Launch::new(work, extras, device, hidden / n, inter / n)? else { return Ok(()) };
        let x = &contiguous(x);
        for (p, part) in self.parts.iter().enumerate() {
            part.gate_up(x, &launch, act, p * inter / n, inter);
        }
        for (p, part) in self.parts.iter().enumerate() {
            part.down(act, &launch, y, p * hidden / n, hidden);
        }
        Ok(())
    }
}

impl Part {
    /// Uploads this part of an expert (gate, up `[inter / parts, hidden]`, down `[hidden /
    /// parts, inter]`, rows of the checkpoint layout) and queues its copy into `slot`. Kernels
    /// queued earlier that read the slot's previous expert run first: the copy is ordered behind
    /// them on the same stream.
    fn store(&self, slot: usize, [g, u, d]: [Vec<f32>; 3], device: &Device) -> Result<(), ShaderError> {
        let gate = &self.gate;
        let (hidden, inter) = (gate.meta.shape()[1], gate.meta.shape()[2]);
        let (down_inter, down_hidden) = (self.down.meta.shape()[1], self.down.meta.shape()[2]);
        // f16 slots take f16 bytes over the link, converted on the host.
        let upload = |v: Vec<f32>, shape: [usize; 2]| -> Result<CubeTensor, ShaderError> {
            if gate.dtype != DType::F16 {
                return cube_float(BurnTensor::<2>::from_data(TensorData::new(v, shape), device));
            }
            let halves: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
            let handle = gate.client.create_from_slice(bytemuck::cast_slice(&halves));
            Ok(CubeTensor::new_contiguous(gate.client.clone(), gate.device.clone(), shape.into(), handle, DType::F16))
        };
        let sources = [upload(g, [inter, hidden])?, upload(u, [inter, hidden])?, upload(d, [down_hidden, down_inter])?];
        self.copy_in(slot, sources);
        Ok(())
    }

    /// Queues the transposing copy of an expert already on the device (gate, up, down in
    /// checkpoint layout, each as many values as one projection of a slot) into `slot`.
    fn copy_in(&self, slot: usize, [g, u, d]: [CubeTensor; 3]) {
        let client = g.client.clone();
        let elems = g.meta.shape().num_elements();
        let cube_dim = CubeDim::new(&client, elems);
        let count = calculate_cube_count_elemwise(&client, elems, cube_dim);
        let dtypes = [dtype_to_storage_type(g.dtype), dtype_to_storage_type(self.gate.dtype)];
        crate::launches::record(&count, &cube_dim);
        store_slot_kernel::launch(
            &client,
            count,
            cube_dim,
            g.into_tensor_arg(),
            u.into_tensor_arg(),
            d.into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            self.up.clone().into_tensor_arg(),
            self.down.clone().into_tensor_arg(),
            slot as u32,
            dtypes,
        );
    }

    fn dtypes(&self, x: &CubeTensor, launch: &Launch) -> [ElemType; 3] {
        [
            dtype_to_storage_type(x.dtype),
            dtype_to_storage_type(self.gate.dtype),
            dtype_to_storage_type(launch.groups.dtype),
        ]
    }

    /// Queues this part's gate/up: `act` columns `offset..` of rows `inter` wide.
    fn gate_up(&self, x: &CubeTensor, launch: &Launch, act: &CubeTensor, offset: usize, inter: usize) {
        let (hidden, rows) = (self.gate.meta.shape()[1], self.gate.meta.shape()[2]);
        let lanes = launch.lanes;
        let shape = launch.shape(hidden, 1);
        launch.record(rows / lanes, &shape, &[&self.gate, &self.up]);
        gate_up_kernel::launch(
            &x.client,
            launch.cubes(rows / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(hidden),
            x.clone().into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            self.up.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            act.clone().into_tensor_arg(),
            launch.bias_gate_up.clone().into_tensor_arg(),
            launch.extras.params.clone().into_tensor_arg(),
            (offset / lanes) as u32,
            (inter / lanes) as u32,
            shape.chunk,
            shape.ways,
            launch.has_bias,
            launch.extras.clamped,
            self.dtypes(x, launch),
        );
    }

    /// Queues this part's down: `y` columns `offset..` of rows `hidden` wide.
    fn down(&self, act: &CubeTensor, launch: &Launch, y: &CubeTensor, offset: usize, hidden: usize) {
        let (inter, rows) = (self.down.meta.shape()[1], self.down.meta.shape()[2]);
        let lanes = launch.lanes;
        let shape = launch.shape(inter, 1);
        launch.record(rows / lanes, &shape, &[&self.down]);
        down_kernel::launch(
            &act.client,
            launch.cubes(rows / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(inter),
            act.clone().into_tensor_arg(),
            self.down.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            launch.weights.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            launch.bias_down.clone().into_tensor_arg(),
            (offset / lanes) as u32,
            (hidden / lanes) as u32,
            shape.chunk,
            shape.ways,
            launch.has_bias,
            self.dtypes(act, launch),
        );
    }
}
