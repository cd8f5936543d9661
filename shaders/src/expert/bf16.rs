//! The grouped expert FFN over BF16 slots, at the checkpoint's own width: wgpu has no bf16 type,
//! so two weights travel in one u32 word and the kernel widens each by a shift, which is exact
//! (a bf16 is the high half of the f32 with the same value).
//!
//! A word pairs two neighbours along the reduction (weights `j` and `j + 1` of one output row,
//! the first in the low half), which is how a BF16 checkpoint's rows already lie in memory read
//! as little-endian u32 words: an upload copies the mapped bytes and the store kernel only
//! transposes words. Slot layout: gate and up `[slots, hidden / 2, intermediate]`, down
//! `[slots, intermediate / 2, hidden]` words. Each lane adds `w_j x_j`, then `w_(j+1) x_(j+1)`, in
//! index order as the f32 kernels do, so a BF16 checkpoint gives the f32 path's output bit for bit.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Device};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::common::{ExpertExtras, Launch, Work, activate, group_at};
use crate::bridge::ShaderError;
use crate::lanes::{contiguous, dot_pairs, input_lanes, load_vec, widen};
use crate::panel::{PANEL, panel_at, panel_walk};
use crate::split::{combine, combine_pair};

/// `act[o, i] = act(gate_i · x_t, up_i · x_t)` over BF16 slots; one unit per `N` adjacent
/// intermediate rows and group.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_bf16_kernel<F: Float, I: Numeric, N: Size, M: Size>(
    x: &Tensor<Vector<F, M>>,       // [tokens, hidden], contiguous; M even
    gate: &Tensor<Vector<u32, N>>,  // [slots, hidden / 2, intermediate] words
    up: &Tensor<Vector<u32, N>>,    // [slots, hidden / 2, intermediate] words
    groups: &Tensor<I>,             // [groups * 4]
    assign: &Tensor<I>,             // [assignments * 2]
    act: &mut Tensor<Vector<F, N>>, // [rows, intermediate]
    bias: &Tensor<F>,
    params: &Tensor<F>,
    chunk: u32, // pairs per chunk
    #[comptime] ways: u32,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let lanes = gate.vector_size();
    let pairs = gate.shape(1);
    let row = gate.shape(2) / lanes;
    let i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = i < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let (first, step) = panel_walk(i, row, pairs, PANEL / lanes);
    let base = group.slot * pairs * row + first;
    let start = min(UNIT_POS_Y as usize * chunk as usize, pairs);
    let end = min(start + chunk as usize, pairs);
    let xm = x.vector_size();
    let per_load = comptime!(xm / 2);
    let hidden = 2 * pairs;
    let inter = row * lanes;
    for a in group.start..group.end {
        let t = usize::cast_from(assign[a * 2]);
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut gs = Vector::<F, N>::new(F::new(0.0));
        let mut us = Vector::<F, N>::new(F::new(0.0));
        if live {
            let mut at = base + start * step;
            let mut p = start;
            while p < end {
                let xv = x[(t * hidden + 2 * p) / xm];
                #[unroll]
                for w in 0..per_load {
                    let x0 = Vector::<F, N>::new(xv.extract(2 * w));
                    let x1 = Vector::<F, N>::new(xv.extract(2 * w + 1));
                    let (g0, g1) = widen::<F, N>(gate[at]);
                    let (u0, u1) = widen::<F, N>(up[at]);
                    gs += g0 * x0;
                    us += u0 * x0;
                    gs += g1 * x1;
                    us += u1 * x1;
                    at += step;
                }
                p += per_load;
            }
        }
        let (gs, us) = combine_pair::<F, N>(gs, us, ways);
        if live && UNIT_POS_Y == 0 {
            let at = group.expert * 2 * inter + i * lanes;
            act[o * row + i] = activate::<F, N>(gs, us, bias, params, at, inter, has_bias, clamped);
        }
    }
}

/// `y[o, h] = w_a * (down_h · act[o] + b_h)` over BF16 slots; one unit per `N` adjacent hidden
/// rows and group.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_bf16_kernel<F: Float, I: Numeric, N: Size, M: Size>(
    act: &Tensor<Vector<F, M>>,    // [rows, intermediate]; M even
    down: &Tensor<Vector<u32, N>>, // [slots, intermediate / 2, hidden] words
    groups: &Tensor<I>,
    assign: &Tensor<I>,
    weights: &Tensor<F>,
    y: &mut Tensor<Vector<F, N>>, // [rows, hidden]
    bias: &Tensor<F>,
    chunk: u32, // pairs per chunk
    #[comptime] ways: u32,
    #[comptime] has_bias: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let lanes = down.vector_size();
    let pairs = down.shape(1);
    let row = down.shape(2) / lanes;
    let h = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let live = h < row;
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let (first, step) = panel_walk(h, row, pairs, PANEL / lanes);
    let base = group.slot * pairs * row + first;
    let start = min(UNIT_POS_Y as usize * chunk as usize, pairs);
    let end = min(start + chunk as usize, pairs);
    let inter = 2 * pairs;
    for a in group.start..group.end {
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        if live {
            s = dot_pairs::<F, N, M>(down, base + start * step, step, act, o * inter, start, end);
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

/// Writes one expert into slot `slot`, transposing words: gate and up `[inter, hidden / 2]` and
/// down `[hidden, inter / 2]` (as many words each) at `offsets` of their sources (one buffer
/// passed three times, or three), one unit per word of a projection.
#[cube(launch)]
#[allow(clippy::too_many_arguments)] // the sources, their offsets and the slot's buffers
fn store_slot_words_kernel(
    gate_src: &Tensor<u32>,
    up_src: &Tensor<u32>,
    down_src: &Tensor<u32>,
    gate: &mut Tensor<u32>,
    up: &mut Tensor<u32>,
    down: &mut Tensor<u32>,
    slot: u32,
    words: u32,
    #[comptime] offsets: [u32; 3],
) {
    let pos = ABSOLUTE_POS;
    let n = words as usize;
    if pos >= n {
        terminate!();
    }
    let pairs = gate.shape(1);
    let inter = gate.shape(2);
    let half_inter = down.shape(1);
    let hidden = down.shape(2);
    let base = slot as usize * n;
    let at = base + panel_at(pos % pairs, pos / pairs, pairs, inter);
    gate[at] = gate_src[offsets[0] as usize + pos];
    up[at] = up_src[offsets[1] as usize + pos];
    down[base + panel_at(pos % half_inter, pos / half_inter, half_inter, hidden)] = down_src[offsets[2] as usize + pos];
}

/// Packs f32 weights (rows of `k`, `k` even) into bf16 words pairing neighbours along the row,
/// rounding to nearest even: exact for values a BF16 checkpoint holds.
pub fn pack_bf16(w: &[f32]) -> Vec<u32> {
    let half = |v: f32| u32::from(half::bf16::from_f32(v).to_bits());
    w.chunks_exact(2).map(|p| half(p[0]) | (half(p[1]) << 16)).collect()
}

/// The f32 values of bf16 words (both halves, low first).
pub fn unpack_bf16(words: &[u32]) -> Vec<f32> {
    words.iter().flat_map(|w| [f32::from_bits(w << 16), f32::from_bits(w & 0xFFFF_0000)]).collect()
}

/// A page of BF16 expert slots: one buffer of words per projection.
pub struct Bf16Page {
    gate: CubeTensor,
    up: CubeTensor,
    down: CubeTensor,
}

impl Bf16Page {
    /// Allocates `slots` experts on `like`'s device, uninitialised; both sizes must be even.
    pub fn new(like: &CubeTensor, slots: usize, hidden: usize, inter: usize) -> Self {
        let make = |shape: [usize; 3]| {
            burn_cubecl::ops::numeric::empty_device_dtype(
                like.client.clone(),
                like.device.clone(),
                shape.into(),
                DType::U32,
            )
        };
        Self {
            gate: make([slots, hidden / 2, inter]),
            up: make([slots, hidden / 2, inter]),
            down: make([slots, inter / 2, hidden]),
        }
    }

    /// Uploads an expert's words in checkpoint layout (gate, up `[intermediate, hidden / 2]`,
    /// down `[hidden, intermediate / 2]`: each row's neighbours paired) and queues their
    /// transposing copy into `slot`, ordered behind kernels that still read the slot.
    pub fn store(&self, slot: usize, [g, u, d]: [&[u32]; 3]) -> Result<(), ShaderError> {
        let (pairs, inter) = (self.gate.meta.shape()[1], self.gate.meta.shape()[2]);
        let hidden = self.down.meta.shape()[2];
        let expected = [inter * pairs, inter * pairs, hidden * (inter / 2)];
        if [g.len(), u.len(), d.len()] != expected {
            return Err(ShaderError::Shape(format!(
                "bf16 expert of {} / {} / {} words for a slot of {expected:?}",
                g.len(),
                u.len(),
                d.len()
            )));
        }
        // One upload and one launch per expert; three uploads where the three projections
        // together pass the largest buffer (Mixtral-8x7B's are 336 MiB).
        let client = self.gate.client.clone();
        let upload = |words: &[u32]| {
            let handle = client.create_from_slice(bytemuck::cast_slice(words));
            CubeTensor::new_contiguous(
                client.clone(),
                self.gate.device.clone(),
                [words.len()].into(),
                handle,
                DType::U32,
            )
        };
        let n = g.len();
        let together = (3 * n * 4) as u64 <= client.properties().memory.max_page_size;
        if together {
            let all = upload(&[g, u, d].concat());
            self.copy_in(slot, [all.clone(), all.clone(), all], n, [0, n as u32, 2 * n as u32]);
        } else {
            self.copy_in(slot, [upload(g), upload(u), upload(d)], n, [0, 0, 0]);
        }
        Ok(())
    }

    /// Queues the copy into `slot` of an expert's words already on the device: gate, up and
    /// down in checkpoint layout (each as many words as one projection of a slot), ordered
    /// behind kernels queued earlier, as `store`.
    pub fn store_device(&self, slot: usize, sources: [CubeTensor; 3]) -> Result<(), ShaderError> {
        let n = self.gate.meta.shape().num_elements() / self.gate.meta.shape()[0].max(1);
        if sources.iter().any(|t| t.meta.shape().num_elements() != n || t.dtype != DType::U32) {
            return Err(ShaderError::Shape(format!(
                "bf16 expert sources of {:?} words for a slot of {n}",
                sources.each_ref().map(|t| t.meta.shape().num_elements())
            )));
        }
        self.copy_in(slot, sources, n, [0, 0, 0]);
        Ok(())
    }

    /// Queues the transposing copy of `n` words per projection from `sources` (at `offsets`).
    fn copy_in(&self, slot: usize, [gs, us, ds]: [CubeTensor; 3], n: usize, offsets: [u32; 3]) {
        let client = self.gate.client.clone();
        let (count, dim) = crate::launches::elementwise(&client, n);
        store_slot_words_kernel::launch(
            &client,
            count,
            dim,
            gs.into_tensor_arg(),
            us.into_tensor_arg(),
            ds.into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            self.up.clone().into_tensor_arg(),
            self.down.clone().into_tensor_arg(),
            slot as u32,
            n as u32,
            offsets,
        );
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
        let (inter, hidden) = (self.gate.meta.shape()[2], self.down.meta.shape()[2]);
        let Some(launch) = Launch::new(work, extras, device, hidden, inter)? else { return Ok(()) };
        let x = &contiguous(x);
        let client = x.client.clone();
        let dtypes = [dtype_to_storage_type(x.dtype), dtype_to_storage_type(launch.groups.dtype)];
        let lanes = launch.lanes;
        let shape = launch.shape(hidden, 2);
        launch.record(inter / lanes, &shape, &[&self.gate, &self.up]);
        gate_up_bf16_kernel::launch(
            &client,
            launch.cubes(inter / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(hidden).max(2),
            x.clone().into_tensor_arg(),
            self.gate.clone().into_tensor_arg(),
            self.up.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            act.clone().into_tensor_arg(),
            launch.bias_gate_up.clone().into_tensor_arg(),
            launch.extras.params.clone().into_tensor_arg(),
            shape.chunk,
            shape.ways,
            launch.has_bias,
            launch.extras.clamped,
            dtypes,
        );
        let shape = launch.shape(inter, 2);
        launch.record(hidden / lanes, &shape, &[&self.down]);
        down_bf16_kernel::launch(
            &client,
            launch.cubes(hidden / lanes, &shape),
            shape.dim,
            lanes,
            input_lanes(inter).max(2),
            act.clone().into_tensor_arg(),
            self.down.clone().into_tensor_arg(),
            launch.groups.clone().into_tensor_arg(),
            launch.assign.clone().into_tensor_arg(),
            launch.weights.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            launch.bias_down.clone().into_tensor_arg(),
            shape.chunk,
            shape.ways,
            launch.has_bias,
            dtypes,
        );
        Ok(())
    }
}
