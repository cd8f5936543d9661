//! The grouped expert FFN: every selected expert of every token of one layer in one pair of
//! kernel launches (gate/up, then down) per slot page, reading the experts' weights straight
//! out of their slots — no per-expert ops, no copies of the weights.
//!
//! The kernels are CubeCL (`#[cube]`) functions, which burn's runtime compiles to WGSL, SPIR-V
//! or MSL for the adapter in use, so they share burn's queue and buffers with the rest of the
//! graph.
//!
//! Layout of a slot (transposed from the checkpoint so that neighbouring units read
//! neighbouring addresses): gate and up `[hidden, intermediate]`, down `[intermediate, hidden]`.
//! Each unit computes four adjacent output rows from one vector load per weight row (one row
//! where the sizes do not divide by four).
//!
//! Exactness: each assignment (token, expert) writes its own output row, and every dot product
//! runs in index order, so a token's result does not depend on which slot or page its experts
//! sit in, nor on which other tokens share the launch. Offloaded output therefore equals
//! all-resident output bit for bit.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::tensor::{DType, Device, Int, Tensor as BurnTensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::grouped_quant::QuantPage;
use super::quant::ExpertDtype;
use super::store::HostExpert;
use crate::error::{FerryError, Result};
use crate::spec::ExpertActivation;

/// Units per cube along the output rows.
pub(super) const ROWS_PER_CUBE: u32 = 64;

/// Adjacent output rows per unit: four (one 16-byte load of f32 weights) when both expert
/// dimensions allow it, else one. Results are the same either way; only the speed differs.
pub(super) fn vector_size(hidden: usize, inter: usize) -> usize {
    if hidden.is_multiple_of(4) && inter.is_multiple_of(4) { 4 } else { 1 }
}

/// One group of assignments: the slot it reads, its assignments `start..end`, and the expert
/// (for the per-expert biases).
#[derive(CubeType)]
pub(super) struct Group {
    pub slot: usize,
    pub start: usize,
    pub end: usize,
    pub expert: usize,
}

/// Decodes group `g` of the flattened `[groups * 4]` table.
#[cube]
pub(super) fn group_at<I: Numeric>(groups: &Tensor<I>, g: usize) -> Group {
    Group {
        slot: usize::cast_from(groups[g * 4]),
        start: usize::cast_from(groups[g * 4 + 1]),
        end: usize::cast_from(groups[g * 4 + 2]),
        expert: usize::cast_from(groups[g * 4 + 3]),
    }
}

/// `N` consecutive values of a scalar tensor from `at` on. Biases are bound as scalars: an
/// unbiased launch binds a two-element stand-in, too short for a vector binding.
#[cube]
pub(crate) fn load_vec<F: Float, N: Size>(t: &Tensor<F>, at: usize) -> Vector<F, N> {
    let mut v = Vector::<F, N>::new(F::new(0.0));
    #[unroll]
    for l in 0..v.vector_size() {
        v.insert(l, t[at + l]);
    }
    v
}

/// The activation between gate/up and down, on every lane. Plain: `silu(g) * u`. With
/// `has_bias`, the expert's gate and up biases of rows `at..` and `at + inter..` are added
/// first; `clamped` is GPT-OSS's `(clamp(u, -l, l) + 1) * g' * sigmoid(alpha * g')` with
/// `g' = min(g, l)` and `params` = `[l, alpha]`.
#[cube]
#[allow(clippy::too_many_arguments)] // the kernel's buffers and switches, passed through
pub(super) fn activate<F: Float, N: Size>(
    gate: Vector<F, N>,
    up: Vector<F, N>,
    bias: &Tensor<F>,
    params: &Tensor<F>,
    at: usize,
    inter: usize,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) -> Vector<F, N> {
    let one = Vector::<F, N>::new(F::new(1.0));
    let zero = Vector::<F, N>::new(F::new(0.0));
    let mut g = gate;
    let mut u = up;
    if has_bias {
        g += load_vec::<F, N>(bias, at);
        u += load_vec::<F, N>(bias, at + inter);
    }
    if clamped {
        let limit = Vector::<F, N>::new(params[0]);
        g = min(g, limit);
        u = min(max(u, zero - limit), limit);
        let sig = one / (one + Vector::exp(zero - g * Vector::new(params[1])));
        (u + one) * (g * sig)
    } else {
        g / (one + Vector::exp(zero - g)) * u
    }
}

/// `act[o, i] = act(gate_i · x_t, up_i · x_t)` for every assignment `(t, o)` of every group;
/// one unit per `N` adjacent intermediate rows `i` and group, one vector load per weight row.
/// Each lane's dot product runs in index order, whatever `N`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_kernel<F: Float, W: Float, I: Numeric, N: Size>(
    x: &Tensor<F>,                  // [tokens, hidden]
    gate: &Tensor<Vector<W, N>>,    // [slots, hidden, intermediate] (f32 or f16; sums in F)
    up: &Tensor<Vector<W, N>>,      // [slots, hidden, intermediate]
    groups: &Tensor<I>,             // [groups * 4]: slot, first assignment, end, expert
    assign: &Tensor<I>,             // [assignments * 2]: token, output row
    act: &mut Tensor<Vector<F, N>>, // [rows, intermediate]
    bias: &Tensor<F>,               // [experts, 2 * intermediate]: gate then up biases (when has_bias)
    params: &Tensor<F>,             // [limit, alpha] (when clamped)
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
    #[define(F, W, I)] _dtypes: [ElemType; 3],
) {
    let lanes = gate.vector_size();
    let hidden = gate.shape(1);
    let row = gate.shape(2) / lanes;
    let i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i >= row {
        terminate!();
    }
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let base = group.slot * hidden * row + i;
    let xs0 = x.stride(0);
    let xs1 = x.stride(1);
    let inter = row * lanes;
    for a in group.start..group.end {
        let t = usize::cast_from(assign[a * 2]);
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut gs = Vector::<F, N>::new(F::new(0.0));
        let mut us = Vector::<F, N>::new(F::new(0.0));
        for j in 0..hidden {
            let xv = Vector::<F, N>::new(x[t * xs0 + j * xs1]);
            gs += Vector::<F, N>::cast_from(gate[base + j * row]) * xv;
            us += Vector::<F, N>::cast_from(up[base + j * row]) * xv;
        }
        let at = group.expert * 2 * inter + i * lanes;
        act[o * row + i] = activate::<F, N>(gs, us, bias, params, at, inter, has_bias, clamped);
    }
}

/// `y[o, h] = w_a * (down_h · act[o] + b_h)` for every assignment (the bias when `has_bias`);
/// one unit per `N` adjacent hidden rows and group.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_kernel<F: Float, W: Float, I: Numeric, N: Size>(
    act: &Tensor<F>,              // [rows, intermediate]
    down: &Tensor<Vector<W, N>>,  // [slots, intermediate, hidden]
    groups: &Tensor<I>,           // [groups * 4]
    assign: &Tensor<I>,           // [assignments * 2]
    weights: &Tensor<F>,          // [assignments]
    y: &mut Tensor<Vector<F, N>>, // [rows, hidden]
    bias: &Tensor<F>,             // [experts, hidden] (when has_bias)
    #[comptime] has_bias: bool,
    #[define(F, W, I)] _dtypes: [ElemType; 3],
) {
    let lanes = down.vector_size();
    let inter = down.shape(1);
    let row = down.shape(2) / lanes;
    let h = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    if h >= row {
        terminate!();
    }
    let group = group_at::<I>(groups, CUBE_POS_Y as usize);
    let base = group.slot * inter * row + h;
    for a in group.start..group.end {
        let o = usize::cast_from(assign[a * 2 + 1]);
        let mut s = Vector::<F, N>::new(F::new(0.0));
        for i in 0..inter {
            s += Vector::<F, N>::cast_from(down[base + i * row]) * Vector::<F, N>::new(act[o * inter + i]);
        }
        if has_bias {
            s += load_vec::<F, N>(bias, group.expert * row * lanes + h * lanes);
        }
        y[o * row + h] = s * Vector::<F, N>::new(weights[a]);
    }
}

/// Writes one expert (checkpoint layout: gate, up `[intermediate, hidden]`, down
/// `[hidden, intermediate]`) into slot `slot` of a page, transposing on the way.
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
    gate[base + c * inter + r] = W::cast_from(gate_src[pos]);
    up[base + c * inter + r] = W::cast_from(up_src[pos]);
    let hr = pos / inter;
    let ic = pos % inter;
    down[base + ic * hidden + hr] = W::cast_from(down_src[pos]);
}

/// A block of expert slots: f32 or f16 in three GPU buffers (gate, up, down), or quantised.
pub enum SlotPage {
    F32(Box<[CubeTensor; 3]>),
    Quant(Box<QuantPage>),
}

/// What a layer's expert kernels add to plain SwiGLU (GPT-OSS): per-expert biases and the
/// clamped activation. Biases are resident (small, and read by every launch), indexed by expert.
#[derive(Clone)]
pub struct ExpertExtras {
    /// Gate and up biases `[experts, 2 * inter]` (gate first), and down biases `[experts, hidden]`.
    pub bias: Option<(CubeTensor, CubeTensor)>,
    /// `[limit, alpha]` of the clamped activation (unread otherwise).
    pub params: CubeTensor,
    pub clamped: bool,
}

impl ExpertExtras {
    /// Uploads a layer's extras: `bias` is (gate then up biases `[experts, 2 * inter]`, down
    /// biases `[experts, hidden]`), row-major.
    pub fn new(bias: Option<(Vec<f32>, Vec<f32>)>, activation: ExpertActivation, device: &Device) -> Result<Self> {
        let upload = |v: Vec<f32>| {
            let len = v.len();
            float(BurnTensor::<1>::from_data(TensorData::new(v, [len]), device))
        };
        let (params, clamped) = match activation {
            ExpertActivation::Silu => (vec![0.0, 0.0], false),
            ExpertActivation::ClampedSwiglu { limit, alpha } => (vec![limit, alpha], true),
        };
        let bias = match bias {
            None => None,
            Some((gate_up, down)) => Some((upload(gate_up)?, upload(down)?)),
        };
        Ok(Self { bias, params: upload(params)?, clamped })
    }

    /// Tensors the kernels take whether or not they read them.
    pub(super) fn bias_args(&self) -> (CubeTensor, CubeTensor) {
        match &self.bias {
            Some((gate_up, down)) => (gate_up.clone(), down.clone()),
            None => (self.params.clone(), self.params.clone()),
        }
    }
}

/// The experts of one page that a launch computes, and the tokens each serves.
#[derive(Default)]
pub struct PageWork {
    /// Per group: slot in the page, first assignment, end, expert (flattened quadruples).
    pub groups: Vec<u32>,
    /// Per assignment: token row in `x`, output row (flattened pairs).
    pub assign: Vec<u32>,
    /// Per assignment: the routing weight.
    pub weights: Vec<f32>,
}

impl PageWork {
    /// Adds one expert's slot and the `(token, output row, weight)` triples it serves.
    pub fn push(&mut self, slot: usize, expert: usize, served: impl IntoIterator<Item = (usize, usize, f32)>) {
        let start = self.weights.len();
        for (token, row, weight) in served {
            self.assign.extend([token as u32, row as u32]);
            self.weights.push(weight);
        }
        self.groups.extend([slot as u32, start as u32, self.weights.len() as u32, expert as u32]);
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl SlotPage {
    /// Allocates a page of `slots` experts stored as `dtype` on `like`'s device, uninitialised.
    pub fn new(like: &CubeTensor, slots: usize, hidden: usize, inter: usize, dtype: ExpertDtype) -> Self {
        if dtype.bits().is_some() {
            return Self::Quant(Box::new(QuantPage::new(like, slots, hidden, inter, dtype)));
        }
        let element = if dtype == ExpertDtype::F16 { DType::F16 } else { like.dtype };
        let make = |shape: [usize; 3]| {
            burn_cubecl::ops::numeric::empty_device_dtype(
                like.client.clone(),
                like.device.clone(),
                shape.into(),
                element,
            )
        };
        Self::F32(Box::new([make([slots, hidden, inter]), make([slots, hidden, inter]), make([slots, inter, hidden])]))
    }

    /// Uploads an expert and queues its copy into `slot`. Kernels queued earlier that read the
    /// slot's previous expert run first: the copy is ordered behind them on the same stream.
    pub fn store(&self, slot: usize, host: HostExpert, device: &Device) -> Result<()> {
        match (self, host) {
            (Self::F32(page), HostExpert::F32([g, u, d])) => {
                let [gate, up, down] = &**page;
                let (hidden, inter) = (gate.meta.shape()[1], gate.meta.shape()[2]);
                // f16 slots take f16 bytes over the link, converted on the host.
                let upload = |v: Vec<f32>, shape: [usize; 2]| -> Result<CubeTensor> {
                    if gate.dtype != DType::F16 {
                        return float(BurnTensor::<2>::from_data(TensorData::new(v, shape), device));
                    }
                    let halves: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
                    let handle = gate.client.create_from_slice(bytemuck::cast_slice(&halves));
                    Ok(CubeTensor::new_contiguous(
                        gate.client.clone(),
                        gate.device.clone(),
                        shape.into(),
                        handle,
                        DType::F16,
                    ))
                };
                let (g, u, d) = (upload(g, [inter, hidden])?, upload(u, [inter, hidden])?, upload(d, [hidden, inter])?);
                let client = g.client.clone();
                let elems = g.meta.shape().num_elements();
                let cube_dim = CubeDim::new(&client, elems);
                let count = calculate_cube_count_elemwise(&client, elems, cube_dim);
                let dtypes = [dtype_to_storage_type(g.dtype), dtype_to_storage_type(gate.dtype)];
                store_slot_kernel::launch(
                    &client,
                    count,
                    cube_dim,
                    g.into_tensor_arg(),
                    u.into_tensor_arg(),
                    d.into_tensor_arg(),
                    gate.clone().into_tensor_arg(),
                    up.clone().into_tensor_arg(),
                    down.clone().into_tensor_arg(),
                    slot as u32,
                    dtypes,
                );
                Ok(())
            }
            (Self::Quant(page), HostExpert::Quant(expert)) => page.store(slot, &expert, device),
            _ => Err(FerryError::Gpu("an expert's format does not match its slot page's".into())),
        }
    }

    /// Queues the grouped SwiGLU of `work` over this page: reads `x` `[tokens, hidden]`,
    /// writes `act` rows and the weighted expert outputs into `y` rows.
    pub fn swiglu(
        &self,
        x: &CubeTensor,
        work: &PageWork,
        extras: &ExpertExtras,
        act: &CubeTensor,
        y: &CubeTensor,
        device: &Device,
    ) -> Result<()> {
        if work.is_empty() {
            return Ok(());
        }
        let ints = |v: &[u32]| int(BurnTensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), device));
        let launch = Launch {
            groups: ints(&work.groups)?,
            assign: ints(&work.assign)?,
            weights: float(BurnTensor::<1>::from_data(
                TensorData::new(work.weights.clone(), [work.weights.len()]),
                device,
            ))?,
            n_groups: (work.groups.len() / 4) as u32,
            extras: extras.clone(),
        };
        match self {
            Self::F32(page) => {
                let [gate, up, down] = &**page;
                launch.f32(x, [gate, up, down], act, y);
                Ok(())
            }
            Self::Quant(page) => {
                page.swiglu(x, &launch, act, y);
                Ok(())
            }
        }
    }
}

/// A page launch's routing, on the GPU.
pub(super) struct Launch {
    pub groups: CubeTensor,
    pub assign: CubeTensor,
    pub weights: CubeTensor,
    pub n_groups: u32,
    pub extras: ExpertExtras,
}

impl Launch {
    /// One unit per `rows` (output rows over the vector size) of each group.
    pub fn cubes(&self, rows: usize) -> CubeCount {
        CubeCount::Static((rows as u32).div_ceil(ROWS_PER_CUBE), self.n_groups, 1)
    }

    fn f32(&self, x: &CubeTensor, [gate, up, down]: [&CubeTensor; 3], act: &CubeTensor, y: &CubeTensor) {
        let client = x.client.clone();
        let dims = gate.meta.shape();
        let (hidden, inter) = (dims[1], dims[2]);
        let dtypes = [
            dtype_to_storage_type(x.dtype),
            dtype_to_storage_type(gate.dtype),
            dtype_to_storage_type(self.groups.dtype),
        ];
        let (bias_gate_up, bias_down) = self.extras.bias_args();
        let has_bias = self.extras.bias.is_some();
        let lanes = vector_size(hidden, inter);
        gate_up_kernel::launch(
            &client,
            self.cubes(inter / lanes),
            CubeDim::new_1d(ROWS_PER_CUBE),
            lanes,
            x.clone().into_tensor_arg(),
            gate.clone().into_tensor_arg(),
            up.clone().into_tensor_arg(),
            self.groups.clone().into_tensor_arg(),
            self.assign.clone().into_tensor_arg(),
            act.clone().into_tensor_arg(),
            bias_gate_up.into_tensor_arg(),
            self.extras.params.clone().into_tensor_arg(),
            has_bias,
            self.extras.clamped,
            dtypes,
        );
        down_kernel::launch(
            &client,
            self.cubes(hidden / lanes),
            CubeDim::new_1d(ROWS_PER_CUBE),
            lanes,
            act.clone().into_tensor_arg(),
            down.clone().into_tensor_arg(),
            self.groups.clone().into_tensor_arg(),
            self.assign.clone().into_tensor_arg(),
            self.weights.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            bias_down.into_tensor_arg(),
            has_bias,
            dtypes,
        );
    }
}

/// The CubeCL tensor under a burn float tensor.
pub fn float<const D: usize>(t: BurnTensor<D>) -> Result<CubeTensor> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => Ok(burn_cubecl::kernel::untile(c)),
        _ => Err(FerryError::Gpu("the grouped expert kernel needs burn's CubeCL (wgpu) backend".into())),
    }
}

/// The CubeCL tensor under a burn float tensor, or the tensor back when the backend is another
/// (for callers that have a plain burn path to fall back on).
pub fn try_float<const D: usize>(t: BurnTensor<D>) -> std::result::Result<CubeTensor, Box<BurnTensor<D>>> {
    let dispatch = t.into_dispatch();
    match dispatch.kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => Ok(burn_cubecl::kernel::untile(c)),
        kind => Err(Box::new(BurnTensor::from_dispatch(DispatchTensor { kind, autodiff: dispatch.autodiff }))),
    }
}

pub(super) fn int<const D: usize>(t: BurnTensor<D, Int>) -> Result<CubeTensor> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Int(c)) => Ok(c),
        _ => Err(FerryError::Gpu("the grouped expert kernel needs burn's CubeCL (wgpu) backend".into())),
    }
}

/// A burn float tensor over a CubeCL tensor.
pub fn wrap<const D: usize>(c: CubeTensor) -> BurnTensor<D> {
    BurnTensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(c)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use std::sync::Arc;

    use super::{ExpertExtras, PageWork, float, wrap};
    use crate::device::{AdapterChoice, Gpu};
    use crate::experts::quant::{ExpertDtype, QuantExpert};
    use crate::experts::slots::SlotPool;
    use crate::experts::store::HostExpert;
    use crate::spec::ExpertActivation;

    fn silu(v: f32) -> f32 {
        v / (1.0 + (-v).exp())
    }

    /// GPT-OSS's extras for the reference: gate then up biases, down biases, clamp limit.
    struct Extras {
        gate_up: Vec<f32>,
        down: Vec<f32>,
        limit: f32,
    }

    /// Plain-Rust expert FFN in checkpoint layout: SwiGLU, or with `extras` (expert `e`'s
    /// biases) GPT-OSS's clamped SwiGLU with alpha 1.702.
    fn expert_ref(
        [gate, up, down]: &[Vec<f32>; 3],
        x: &[f32],
        hidden: usize,
        inter: usize,
        extras: Option<(&Extras, usize)>,
    ) -> Vec<f32> {
        let dot = |w: &[f32], row: usize, v: &[f32], n: usize| (0..n).map(|j| w[row * n + j] * v[j]).sum::<f32>();
        let act: Vec<f32> = (0..inter)
            .map(|i| {
                let (g, u) = (dot(gate, i, x, hidden), dot(up, i, x, hidden));
                match extras {
                    None => silu(g) * u,
                    Some((ex, e)) => {
                        let g = (g + ex.gate_up[e * 2 * inter + i]).min(ex.limit);
                        let u = (u + ex.gate_up[e * 2 * inter + inter + i]).clamp(-ex.limit, ex.limit);
                        (u + 1.0) * (g / (1.0 + (-1.702 * g).exp()))
                    }
                }
            })
            .collect();
        (0..hidden).map(|h| dot(down, h, &act, inter) + extras.map_or(0.0, |(ex, e)| ex.down[e * hidden + h])).collect()
    }

    /// Imbalanced routing (one expert serves every token), experts serving nobody, a token with
    /// a single expert (a little token), and experts spread over three pages: the kernel's rows
    /// match a CPU reference, and rows nobody was routed to stay zero.
    #[test]
    fn grouped_swiglu_matches_a_cpu_reference_across_pages_and_odd_routing() {
        check_against_reference(ExpertDtype::F32, 24, 40, false);
        check_against_reference(ExpertDtype::F16, 24, 40, false);
        // Sizes that do not divide by four: one row per unit instead of four.
        check_against_reference(ExpertDtype::F32, 26, 42, false);
        check_against_reference(ExpertDtype::F32, 26, 42, true);
    }

    /// The same routing over int8, int4, int3, int2 and MXFP4 slots: the kernel equals a CPU reference run
    /// on the weights the codes stand for.
    #[test]
    fn quantised_grouped_swiglu_matches_a_cpu_reference_on_dequantised_weights() {
        check_against_reference(ExpertDtype::Int8, 64, 32, false);
        check_against_reference(ExpertDtype::Int4, 32, 64, false);
        check_against_reference(ExpertDtype::Mxfp4, 32, 64, false);
        check_against_reference(ExpertDtype::Int2, 64, 32, false);
        check_against_reference(ExpertDtype::Int3, 64, 96, false);
    }

    /// GPT-OSS's experts (per-expert biases, clamped SwiGLU) in every slot format.
    #[test]
    fn biased_clamped_experts_match_a_cpu_reference_in_every_format() {
        for dtype in [
            ExpertDtype::F32,
            ExpertDtype::F16,
            ExpertDtype::Int8,
            ExpertDtype::Int4,
            ExpertDtype::Int3,
            ExpertDtype::Int2,
            ExpertDtype::Mxfp4,
        ] {
            check_against_reference(dtype, 64, 32, true);
        }
    }

    fn check_against_reference(dtype: ExpertDtype, hidden: usize, inter: usize, gpt_oss: bool) {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        let device = &gpu.device;
        let (tokens, k) = (5, 2);
        let mut rng = StdRng::seed_from_u64(7);
        let mut random = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let weights: Vec<[Vec<f32>; 3]> =
            (0..5).map(|_| [random(inter * hidden), random(inter * hidden), random(hidden * inter)]).collect();
        let x = random(tokens * hidden);
        // What is uploaded, and the f32 weights it stands for (the reference's).
        let (hosts, experts): (Vec<HostExpert>, Vec<[Vec<f32>; 3]>) = match dtype.bits() {
            // f16 slots hold the weights rounded to half precision.
            None if dtype == ExpertDtype::F16 => weights
                .iter()
                .map(|w| {
                    let half = w.clone().map(|v| v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect());
                    (HostExpert::F32(w.clone()), half)
                })
                .unzip(),
            None => weights.iter().map(|w| (HostExpert::F32(w.clone()), w.clone())).unzip(),
            Some(_) => weights
                .iter()
                .map(|w| {
                    let q = QuantExpert::new(w, hidden, inter, dtype);
                    let back = q.dequantize(hidden, inter);
                    (HostExpert::Quant(Arc::new(q)), back)
                })
                .unzip(),
        };
        // Two slots per page: slots 0-1, 2-3 and 4 live in three pages.
        let page_bytes = (hidden * inter) as u64 * u64::from(dtype.weight_bits()) / 8 * 2;
        let mut pool = SlotPool::new(device, 5, hidden, inter, dtype, Some(page_bytes)).unwrap();
        let at: Vec<_> = hosts.into_iter().enumerate().map(|(i, e)| pool.store(i, e).unwrap()).collect();
        assert_eq!(at.iter().map(|a| a.page).collect::<Vec<_>>(), [0, 0, 1, 1, 2]);

        // (token, rank, expert, weight): expert 0 serves everyone; 1 and 3 nobody; token 4 is little.
        let routes = [(0, 0, 0, 0.6), (0, 1, 2, 0.4), (1, 0, 0, 0.5), (1, 1, 4, 0.5), (2, 0, 4, 0.7)];
        let routes = [&routes[..], &[(2, 1, 0, 0.3), (3, 0, 0, 1.0), (3, 1, 2, 0.25), (4, 0, 0, 1.0)]].concat();
        let xc = float(Tensor::<2>::from_data(TensorData::new(x.clone(), [tokens, hidden]), device)).unwrap();
        // Large enough weights that the clamp at 1.5 cuts a good share of gate and up values.
        let reference_extras = gpt_oss.then(|| Extras {
            gate_up: (0..5 * 2 * inter).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect(),
            down: (0..5 * hidden).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect(),
            limit: 1.5,
        });
        let extras = match &reference_extras {
            None => ExpertExtras::new(None, ExpertActivation::Silu, device).unwrap(),
            Some(ex) => ExpertExtras::new(
                Some((ex.gate_up.clone(), ex.down.clone())),
                ExpertActivation::ClampedSwiglu { limit: ex.limit, alpha: 1.702 },
                device,
            )
            .unwrap(),
        };
        let act = float(Tensor::<2>::empty([tokens * k, inter], device)).unwrap();
        let y = float(Tensor::<2>::zeros([tokens * k, hidden], device)).unwrap();
        for page in 0..3 {
            let mut work = PageWork::default();
            for (e, a) in at.iter().enumerate().filter(|(_, a)| a.page == page) {
                let served = routes.iter().filter(|r| r.2 == e).map(|&(t, rank, _, w)| (t, t * k + rank, w));
                if served.clone().count() > 0 {
                    work.push(a.slot, e, served);
                }
            }
            pool.page(page).unwrap().swiglu(&xc, &work, &extras, &act, &y, device).unwrap();
        }
        let got: Vec<f32> = wrap::<2>(y).into_data().try_into_vec::<f32>().unwrap();
        // Quantised sums run group by group, so their rounding differs a little more.
        let tolerance = if dtype == ExpertDtype::F32 { 1e-5 } else { 1e-4 };
        for t in 0..tokens {
            for rank in 0..k {
                let row = &got[(t * k + rank) * hidden..][..hidden];
                match routes.iter().find(|r| r.0 == t && r.1 == rank) {
                    None => assert!(row.iter().all(|&v| v == 0.0), "{dtype}: token {t} rank {rank} was not routed"),
                    Some(&(_, _, e, w)) => {
                        let ex = reference_extras.as_ref().map(|ex| (ex, e));
                        let want = expert_ref(&experts[e], &x[t * hidden..][..hidden], hidden, inter, ex);
                        for (g, r) in row.iter().zip(&want) {
                            assert!(
                                (g - r * w).abs() <= tolerance * (1.0 + r.abs()),
                                "{dtype}: token {t} expert {e}: {g} vs {}",
                                r * w
                            );
                        }
                    }
                }
            }
        }
    }
}
