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
/// Matrix launches by units started: bucket `k` counts launches of `2^k` to `2^(k+1) - 1` units.
static UNIT_BUCKETS: [AtomicU64; BUCKETS] = [const { AtomicU64::new(0) }; BUCKETS];

/// Buckets of the units histogram (up to 2^32 units per launch).
pub const BUCKETS: usize = 33;

/// Launches counted so far (subtract two readings for a pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launches {
    pub launches: u64,
    /// Units (invocations) started by those launches.
    pub units: u64,
    /// Launches of the matrix kernels (matrix-vector products, grouped experts).
    pub matrix_launches: u64,
    pub matrix_units: u64,
    /// Weight bytes the matrix kernels read.
    pub weight_bytes: u64,
    /// Matrix launches by units started (`UNIT_BUCKETS`): how many offered fewer than a GPU
    /// needs, which an average hides.
    pub units_histogram: [u64; BUCKETS],
}

impl Default for Launches {
    fn default() -> Self {
        Launches {
            launches: 0,
            units: 0,
            matrix_launches: 0,
            matrix_units: 0,
            weight_bytes: 0,
            units_histogram: [0; BUCKETS],
        }
    }
}

impl Launches {
    /// Matrix launches that started fewer than `units` units (a power of two).
    pub fn matrix_launches_below(&self, units: u64) -> u64 {
        let limit = units.max(1).trailing_zeros() as usize;
        self.units_histogram[..limit.min(BUCKETS)].iter().sum()
    }

    /// The lower bound of the smallest matrix launch's units (a power of two); None without
    /// matrix launches.
    pub fn smallest_matrix_launch(&self) -> Option<u64> {
        self.units_histogram.iter().position(|&n| n > 0).map(|k| 1u64 << k)
    }
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
            units_histogram: std::array::from_fn(|k| self.units_histogram[k] - before.units_histogram[k]),
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
        units_histogram: std::array::from_fn(|k| UNIT_BUCKETS[k].load(Relaxed)),
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

/// The shape of a launch with one unit per element over `n` elements (at least one unit),
/// counted as launched.
pub(crate) fn elementwise(client: &cubecl::client::Client, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, n.max(1));
    let count = cubecl::calculate_cube_count_elemwise(client, n.max(1), dim);
    record(&count, &dim);
    (count, dim)
}

/// Counts one launch.
pub(crate) fn record(count: &CubeCount, dim: &CubeDim) {
    LAUNCHES.fetch_add(1, Relaxed);
    UNITS.fetch_add(units(count, dim), Relaxed);
}

/// Counts one launch of a matrix kernel that reads `weight_bytes` of weights.
pub(crate) fn record_matrix(count: &CubeCount, dim: &CubeDim, weight_bytes: u64) {
    record(count, dim);
    let n = units(count, dim);
    MATRIX_LAUNCHES.fetch_add(1, Relaxed);
    MATRIX_UNITS.fetch_add(n, Relaxed);
    WEIGHT_BYTES.fetch_add(weight_bytes, Relaxed);
    let bucket = (63 - n.max(1).leading_zeros()) as usize;
    UNIT_BUCKETS[bucket.min(BUCKETS - 1)].fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::{BUCKETS, Launches};

    #[test]
    fn the_histogram_counts_small_launches() {
        let mut l = Launches::default();
        l.units_histogram[10] = 2; // 1024..2047 units
        l.units_histogram[15] = 1; // 32768..
        assert_eq!(l.matrix_launches_below(1 << 15), 2);
        assert_eq!(l.matrix_launches_below(1 << 16), 3);
        assert_eq!(l.smallest_matrix_launch(), Some(1024));
        assert_eq!(Launches::default().smallest_matrix_launch(), None);
        assert_eq!(l.units_histogram.len(), BUCKETS);
    }
}
