//! How the decode kernels (matrix-vector, grouped experts) share one dot product among units.
//!
//! A decode step's products have few outputs and long reductions: an OLMoE projection has 2,048
//! outputs, 512 units of four, each walking 2,048 inputs. A GPU needs tens of thousands of loads
//! in flight to reach its memory bandwidth, so on a GPU each dot product is split into `ways`
//! chunks of the reduction, one unit per chunk (the cube's second dimension), and the chunks'
//! sums are added by the first unit in chunk order: deterministic, and the same for every launch
//! of the same reduction length, so offloaded output still equals resident output bit for bit.
//!
//! A CPU adapter (lavapipe) runs a cube's units one SIMD batch after another, and a barrier
//! costs it a coroutine switch: there the split buys nothing, and `ways` stays 1 (today's shape).

use cubecl::CubeDim;
use cubecl::prelude::*;

/// Units per cube when the reduction is split.
pub const SPLIT_UNITS: u32 = 256;
/// Units per cube along the outputs when it is not (64, the shape the kernels had before).
pub const WHOLE_UNITS: u32 = 64;
/// The shortest chunk a unit is given, in reduction steps (inputs, or pairs, or quantisation
/// groups are counted as their inputs): shorter chunks would spend more on combining than on
/// loading.
pub const MIN_CHUNK: usize = 32;
/// The most ways a dot product is split: 4 output units of 64 chunks still read 64 contiguous
/// bytes of each weight row (two full 32-byte sectors).
pub const MAX_WAYS: u32 = 64;

/// Chunks start at multiples of this many inputs: the kernels load the activations four at a
/// time (`crate::lanes::input_lanes`), and the f32 and bf16-pair kernels must chunk alike.
pub const ALIGN: usize = 4;

/// The largest split the kernels may use: 1 keeps every dot product in one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    max_ways: u32,
    min_chunk: usize,
}

impl Split {
    /// Every dot product whole, in one unit (a CPU adapter's shape).
    pub const WHOLE: Split = Split { max_ways: 1, min_chunk: MIN_CHUNK };
    /// Up to `MAX_WAYS` ways (a GPU's shape).
    pub const GPU: Split = Split { max_ways: MAX_WAYS, min_chunk: MIN_CHUNK };

    /// At most `max_ways` ways (a power of two from 1 to `MAX_WAYS`); None otherwise.
    pub fn at_most(max_ways: u32) -> Option<Split> {
        (max_ways.is_power_of_two() && max_ways <= MAX_WAYS).then_some(Split { max_ways, min_chunk: MIN_CHUNK })
    }

    /// Chunks as short as `min_chunk`: the tests' small matrices split as many ways as a real
    /// model's.
    #[cfg(test)]
    pub(crate) fn fine(max_ways: u32, min_chunk: usize) -> Split {
        Split { max_ways, min_chunk }
    }

    /// What this adapter gets: a CPU adapter (`crate::bridge::cpu_adapter`) keeps whole dot
    /// products; every other one splits.
    pub fn for_client(client: &cubecl::client::Client) -> Split {
        if crate::bridge::cpu_adapter(client) { Split::WHOLE } else { Split::GPU }
    }

    pub fn max_ways(self) -> u32 {
        self.max_ways
    }

    /// Ways for a reduction of `steps` inputs: the largest power of two that leaves every chunk
    /// at least `MIN_CHUNK` long, at most `max_ways`. Depends on nothing else, so every launch
    /// over experts of one shape splits alike.
    pub fn ways(self, steps: usize) -> u32 {
        let most = (steps / self.min_chunk).clamp(1, u32::MAX as usize) as u32;
        let fit = 1u32 << (31 - most.leading_zeros());
        fit.min(self.max_ways)
    }

    /// The cube of a launch split `ways` ways: outputs along x, chunks along y.
    pub fn cube_dim(ways: u32) -> CubeDim {
        if ways == 1 { CubeDim::new_1d(WHOLE_UNITS) } else { CubeDim::new_2d(SPLIT_UNITS / ways, ways) }
    }

    /// The chunk length for `steps` inputs in `ways` ways, rounded up to a multiple of `align`
    /// (`ALIGN` for float reductions, so that an f32 and a bf16-pair reduction chunk alike).
    pub fn chunk(steps: usize, ways: u32, align: usize) -> usize {
        steps.div_ceil(ways as usize).div_ceil(align) * align
    }

    /// The launch shape for a reduction of `steps` inputs that a kernel walks `per_step` at a
    /// time (1 for f32, 2 for bf16 pairs, `GROUP` for quantised codes): chunks of whole steps,
    /// the f32 and bf16 kernels' on the same boundaries.
    pub fn shape(self, steps: usize, per_step: usize) -> Shape {
        let ways = self.ways(steps);
        let chunk = Split::chunk(steps, ways, per_step.max(ALIGN)) / per_step;
        Shape { ways, dim: Split::cube_dim(ways), chunk: chunk as u32 }
    }
}

/// One launch's split: ways, cube, and chunk length.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub ways: u32,
    pub dim: CubeDim,
    /// Reduction steps per chunk, in the kernel's own steps (inputs, pairs or quantisation
    /// groups).
    pub chunk: u32,
}

/// The sum of `value` over the cube's `ways` rows (`UNIT_POS_Y`) of each output column, added in
/// row order, for the units of row 0 (the others get a partial sum back). Every unit of the cube
/// must call it; with one way it is `value`, and no shared memory or barrier is used.
#[cube]
pub fn combine<F: Float, N: Size>(value: Vector<F, N>, #[comptime] ways: u32) -> Vector<F, N> {
    let mut total = value;
    if comptime!(ways > 1) {
        let width = comptime!((SPLIT_UNITS / ways) as usize);
        let mut partial = Shared::<[Vector<F, N>]>::new_slice(comptime!(SPLIT_UNITS as usize));
        let x = UNIT_POS_X as usize;
        partial[UNIT_POS_Y as usize * width + x] = value;
        sync_cube();
        if UNIT_POS_Y == 0 {
            #[unroll]
            for w in 1..comptime!(ways as usize) {
                total += partial[w * width + x];
            }
        }
        // The next call may overwrite the partials only once every row-0 unit has read them.
        sync_cube();
    }
    total
}

/// `combine` of two values at once (gate and up), with one pair of barriers.
#[cube]
pub fn combine_pair<F: Float, N: Size>(
    a: Vector<F, N>,
    b: Vector<F, N>,
    #[comptime] ways: u32,
) -> (Vector<F, N>, Vector<F, N>) {
    let mut ta = a;
    let mut tb = b;
    if comptime!(ways > 1) {
        let width = comptime!((SPLIT_UNITS / ways) as usize);
        let mut pa = Shared::<[Vector<F, N>]>::new_slice(comptime!(SPLIT_UNITS as usize));
        let mut pb = Shared::<[Vector<F, N>]>::new_slice(comptime!(SPLIT_UNITS as usize));
        let x = UNIT_POS_X as usize;
        let at = UNIT_POS_Y as usize * width + x;
        pa[at] = a;
        pb[at] = b;
        sync_cube();
        if UNIT_POS_Y == 0 {
            #[unroll]
            for w in 1..comptime!(ways as usize) {
                ta += pa[w * width + x];
                tb += pb[w * width + x];
            }
        }
        sync_cube();
    }
    (ta, tb)
}

/// The chunks' sums added as `combine` adds them, on the host: chunk `w` of `chunk` steps summed
/// in index order by `term(j)`, then the chunks in order.
pub fn reference_sum(steps: usize, chunk: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut total = 0.0f32;
    for (w, start) in (0..steps).step_by(chunk.max(1)).enumerate() {
        let part: f32 = (start..(start + chunk).min(steps)).map(&term).sum();
        total = if w == 0 { part } else { total + part };
    }
    total
}

#[cfg(test)]
mod tests {
    use super::Split;

    #[test]
    fn ways_depend_on_the_reduction_length_only_and_keep_chunks_long() {
        assert_eq!(Split::WHOLE.ways(4096), 1);
        assert_eq!(Split::GPU.ways(2048), 64);
        assert_eq!(Split::GPU.ways(1024), 32);
        assert_eq!(Split::GPU.ways(768), 16);
        assert_eq!(Split::GPU.ways(40), 1);
        assert_eq!(Split::GPU.ways(1 << 20), 64);
        assert_eq!(Split::at_most(8).unwrap().ways(4096), 8);
        assert!(Split::at_most(3).is_none() && Split::at_most(128).is_none());
        assert_eq!(Split::chunk(24, 8, 2), 4);
        assert_eq!(Split::chunk(2048, 64, 2), 32);
        assert_eq!(Split::cube_dim(64).num_elems(), 256);
        assert_eq!(Split::cube_dim(1).num_elems(), 64);
        assert_eq!(Split::fine(64, 2).ways(24), 8);
    }
}
