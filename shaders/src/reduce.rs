//! The workgroup reduction the fused kernels share: every unit of a cube contributes one value,
//! and a fixed tree combines them, so the result does not depend on timing.

use cubecl::prelude::*;

/// Units per cube of the kernels that reduce with `cube_reduce`.
pub const UNITS: usize = 64;
/// `log2(UNITS)`: the levels of the tree.
const LEVELS: usize = 6;

/// The sum (or, with `take_max`, the maximum) of `value` over the cube's `UNITS` units, the same
/// for every unit. Every unit must call it.
#[cube]
pub fn cube_reduce<F: Float>(value: F, #[comptime] take_max: bool) -> F {
    let unit = UNIT_POS_X as usize;
    let mut partial = Shared::<[F]>::new_slice(comptime!(UNITS));
    partial[unit] = value;
    sync_cube();
    #[unroll]
    for level in 0..LEVELS {
        let half = comptime!(UNITS >> (level + 1));
        if unit < half {
            let other = partial[unit + half];
            if take_max {
                partial[unit] = max(partial[unit], other);
            } else {
                partial[unit] += other;
            }
        }
        sync_cube();
    }
    partial[0]
}
