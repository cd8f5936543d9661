//! What the grouped expert kernels share: the launch shape, the group table, the activation
//! between gate/up and down, the per-expert extras and a page's work list.
//!
//! Layout of a slot (transposed from the checkpoint so that neighbouring units read
//! neighbouring addresses): gate and up `[hidden, intermediate]`, down `[intermediate, hidden]`,
//! stored in panels of output columns (`crate::panel`). Each unit computes four adjacent
//! output rows from one vector load per weight row (one row where the sizes do not divide by
//! four) over one chunk of the reduction (`crate::split`).

use burn::tensor::{Device, Int, Tensor as BurnTensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeCount;
use cubecl::prelude::*;

use crate::bridge::{ShaderError, cube_float, cube_int};
use crate::lanes::load_vec;
use crate::split::{Shape, Split};

/// Adjacent output rows per unit: four (one 16-byte load of f32 weights) when both expert
/// dimensions allow it, else one. Results are the same either way; only the speed differs.
pub fn vector_size(hidden: usize, inter: usize) -> usize {
    if hidden.is_multiple_of(4) && inter.is_multiple_of(4) { 4 } else { 1 }
}

/// One group of assignments: the slot it reads, its assignments `start..end`, and the expert
/// (for the per-expert biases).
#[derive(CubeType)]
pub struct Group {
    pub slot: usize,
    pub start: usize,
    pub end: usize,
    pub expert: usize,
}

/// Decodes group `g` of the flattened `[groups * 4]` table.
#[cube]
pub fn group_at<I: Numeric>(groups: &Tensor<I>, g: usize) -> Group {
    Group {
        slot: usize::cast_from(groups[g * 4]),
        start: usize::cast_from(groups[g * 4 + 1]),
        end: usize::cast_from(groups[g * 4 + 2]),
        expert: usize::cast_from(groups[g * 4 + 3]),
    }
}

/// The activation between gate/up and down, on every lane. Plain: `silu(g) * u`. With
/// `has_bias`, the expert's gate and up biases of rows `at..` and `at + inter..` are added
/// first; `clamped` is GPT-OSS's `(clamp(u, -l, l) + 1) * g' * sigmoid(alpha * g')` with
/// `g' = min(g, l)` and `params` = `[l, alpha]`.
#[cube]
#[allow(clippy::too_many_arguments)] // the kernel's buffers and switches, passed through
pub fn activate<F: Float, N: Size>(
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

/// What a layer's expert kernels add to plain SwiGLU (GPT-OSS): per-expert biases and the
/// clamped activation. Biases are resident (small, and read by every launch), indexed by expert.
#[derive(Clone)]
pub struct ExpertExtras {
    /// Gate and up biases `[experts, 2 * inter]` (gate first), and down biases `[experts, hidden]`.
    pub bias: Option<(CubeTensor, CubeTensor)>,
    /// `[limit, alpha]` of the clamped activation (unread otherwise).
    pub params: CubeTensor,
    pub clamped: bool,
    /// How the layer's dot products are split among units.
    pub split: Split,
}

impl ExpertExtras {
    /// Uploads a layer's extras: `bias` is (gate then up biases `[experts, 2 * inter]`, down
    /// biases `[experts, hidden]`), row-major; `clamp` is GPT-OSS's `(limit, alpha)`, None for
    /// plain SwiGLU; `split` is how the kernels share each dot product among units.
    pub fn new(
        bias: Option<(Vec<f32>, Vec<f32>)>,
        clamp: Option<(f32, f32)>,
        split: Split,
        device: &Device,
    ) -> Result<Self, ShaderError> {
        let upload = |v: Vec<f32>| {
            let len = v.len();
            cube_float(BurnTensor::<1>::from_data(TensorData::new(v, [len]), device))
        };
        let (params, clamped) = match clamp {
            None => (vec![0.0, 0.0], false),
            Some((limit, alpha)) => (vec![limit, alpha], true),
        };
        let bias = match bias {
            None => None,
            Some((gate_up, down)) => Some((upload(gate_up)?, upload(down)?)),
        };
        Ok(Self { bias, params: upload(params)?, clamped, split })
    }

    /// Tensors the kernels take whether or not they read them.
    pub(crate) fn bias_args(&self) -> (CubeTensor, CubeTensor) {
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

/// A page launch's tables built on the device from routes that stay there (`route::tables`):
/// `n_groups` groups of one assignment each.
pub struct DeviceWork {
    pub groups: CubeTensor,
    pub assign: CubeTensor,
    pub weights: CubeTensor,
    pub n_groups: usize,
}

/// The work of one page launch: tables built on the host and uploaded, or already on the device.
#[derive(Clone, Copy)]
pub enum Work<'a> {
    Host(&'a PageWork),
    Device(&'a DeviceWork),
}

impl<'a> From<&'a PageWork> for Work<'a> {
    fn from(work: &'a PageWork) -> Self {
        Work::Host(work)
    }
}

impl<'a> From<&'a DeviceWork> for Work<'a> {
    fn from(work: &'a DeviceWork) -> Self {
        Work::Device(work)
    }
}

/// A page launch's routing, on the GPU.
pub(crate) struct Launch {
    pub groups: CubeTensor,
    pub assign: CubeTensor,
    pub weights: CubeTensor,
    pub n_groups: u32,
    pub extras: ExpertExtras,
    /// The biases the kernels bind (a stand-in when the layer has none), and whether they apply.
    pub bias_gate_up: CubeTensor,
    pub bias_down: CubeTensor,
    pub has_bias: bool,
    /// Adjacent output rows per unit (`vector_size`).
    pub lanes: usize,
}

impl Launch {
    /// The layer's split for a reduction of `steps` inputs walked `per_step` at a time.
    pub fn shape(&self, steps: usize, per_step: usize) -> Shape {
        self.extras.split.shape(steps, per_step)
    }

    /// One unit per `rows` (output rows over the vector size) and chunk of each group.
    pub fn cubes(&self, rows: usize, shape: &Shape) -> CubeCount {
        CubeCount::Static((rows as u32).div_ceil(shape.dim.x), self.n_groups, 1)
    }

    /// Counts a launch over `rows` output rows per group that reads, per group, one slot of
    /// each of `projections`.
    pub fn record(&self, rows: usize, shape: &Shape, projections: &[&CubeTensor]) {
        let per_group: u64 = projections.iter().map(|t| slot_bytes(t)).sum();
        crate::launches::record_matrix(&self.cubes(rows, shape), &shape.dim, per_group * u64::from(self.n_groups));
    }

    /// Uploads `work`'s tables (or takes them from the device) for experts of `hidden` x
    /// `inter`; None when there is no work.
    pub fn new(
        work: Work<'_>,
        extras: &ExpertExtras,
        device: &Device,
        hidden: usize,
        inter: usize,
    ) -> Result<Option<Self>, ShaderError> {
        let (groups, assign, weights, n_groups) = match work {
            Work::Host(work) if work.is_empty() => return Ok(None),
            Work::Host(work) => {
                let ints = |v: &[u32]| {
                    cube_int(BurnTensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), device))
                };
                let weights =
                    BurnTensor::<1>::from_data(TensorData::new(work.weights.clone(), [work.weights.len()]), device);
                (ints(&work.groups)?, ints(&work.assign)?, cube_float(weights)?, work.groups.len() / 4)
            }
            Work::Device(work) if work.n_groups == 0 => return Ok(None),
            Work::Device(work) => (work.groups.clone(), work.assign.clone(), work.weights.clone(), work.n_groups),
        };
        let (bias_gate_up, bias_down) = extras.bias_args();
        Ok(Some(Self {
            groups,
            assign,
            weights,
            n_groups: n_groups as u32,
            extras: extras.clone(),
            bias_gate_up,
            bias_down,
            has_bias: extras.bias.is_some(),
            lanes: vector_size(hidden, inter),
        }))
    }
}

/// Bytes of one slot of a page buffer `[slots, ...]`.
fn slot_bytes(t: &CubeTensor) -> u64 {
    let shape = t.meta.shape();
    (shape.num_elements() / shape[0].max(1) * t.dtype.size()) as u64
}
