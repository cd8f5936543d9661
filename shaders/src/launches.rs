//! Counts of this crate's kernel launches, for figures that do not depend on the hardware: how
//! many launches a pass makes, how many units (invocations) they start, and, for the matrix
//! kernels (matrix-vector, grouped experts), how many weight bytes they read. Units per launch
//! and bytes per unit are the parallelism a GPU is offered. Process-wide counters: read them
//! around one generation at a time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use cubecl::{CubeCount, CubeDim};

static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static UNITS: AtomicU64 = AtomicU64::new(0);
static MATRIX_LAUNCHES: AtomicU64 = AtomicU64::new(0);
static MATRIX_UNITS: AtomicU64 = AtomicU64::new(0);
static WEIGHT_BYTES: AtomicU64 = AtomicU64::new(0);

/// Launches counted so far (subtract two readings for a pass).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Launches {
    pub launches: u64,
    /// Units (invocations) started by those launches.
    pub units: u64,
    /// Launches of the matrix kernels (matrix-vector products, grouped experts).
    pub matrix_launches: u64,
    pub matrix_units: u64,
    /// Weight bytes the matrix kernels read.
    pub weight_bytes: u64,
}

impl std::ops::Sub for Launches {
    type Output = Launches;

    fn sub(self, before: Launches) -> Launches {
        Launches {
            launches: self.launches - before.launches,
            units: self.units - before.units,
            matrix_launches: self.matrix_launches - before.matrix_launches,
            matrix_units: self.matrix_units - before.matrix_units,
            weight_bytes: self.weight_bytes - before.weight_bytes,
        }
    }
}

/// The counts now.
pub fn counted() -> Launches {
    Launches {
        launches: LAUNCHES.load(Relaxed),
        units: UNITS.load(Relaxed),
        matrix_launches: MATRIX_LAUNCHES.load(Relaxed),
        matrix_units: MATRIX_UNITS.load(Relaxed),
        weight_bytes: WEIGHT_BYTES.load(Relaxed),
    }
}

/// Units a launch of `count` cubes of `dim` starts.
fn units(count: &CubeCount, dim: &CubeDim) -> u64 {
    let cubes = match count {
        CubeCount::Static(x, y, z) => u64::from(*x) * u64::from(*y) * u64::from(*z),
        _ => 0,
    };
    cubes * u64::from(dim.num_elems())
}

/// Counts one launch.
pub(crate) fn record(count: &CubeCount, dim: &CubeDim) {
    LAUNCHES.fetch_add(1, Relaxed);
    UNITS.fetch_add(units(count, dim), Relaxed);
}

/// Counts one launch of a matrix kernel that reads `weight_bytes` of weights.
pub(crate) fn record_matrix(count: &CubeCount, dim: &CubeDim, weight_bytes: u64) {
    record(count, dim);
    MATRIX_LAUNCHES.fetch_add(1, Relaxed);
    MATRIX_UNITS.fetch_add(units(count, dim), Relaxed);
    WEIGHT_BYTES.fetch_add(weight_bytes, Relaxed);
}
