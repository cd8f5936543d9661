//! A plain streaming read: every unit sums its share of a buffer, 16 bytes per load, neighbouring
//! units at neighbouring addresses, and writes one value. It reads each byte once and writes
//! almost nothing, so its rate is the adapter's own read ceiling: the figure a decode step,
//! which only reads weights, is measured against.
//!
//! Two orders, and the ceiling is the faster: a grid stride (at each step the whole launch
//! reads one contiguous stretch: a GPU's coalesced order), and runs (each `RUN` neighbouring
//! units walk their own contiguous stretch: the order a CPU adapter's SIMD batch streams best,
//! and the one the panelled expert slots give the decode kernels).

use std::time::Instant;

use burn::tensor::{DType, Tensor};
use cubecl::{CubeCount, CubeDim};

use self::kernel::read_kernel;

use crate::bridge::{ShaderError, cube_float};

/// Units per cube.
const UNITS: u32 = 256;
/// Units that share a run in the `runs` order: a panel's width in vectors of four.
pub(crate) const RUN: usize = crate::panel::PANEL / 4;

/// The order a probe reads its buffer in (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    GridStride,
    Runs,
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// `out[u] = sum of input[u + k * stride]` over every `k` in range (`runs`: of unit `u`'s
    /// run's stretch, every `RUN`th vector from its lane on), lanes added in order.
    #[cube(launch)]
    pub(super) fn read_kernel<N: Size>(
        input: &Tensor<Vector<f32, N>>,
        out: &mut Tensor<f32>,
        stride: u32,
        per_run: u32,
        #[comptime] runs: bool,
    ) {
        let u = ABSOLUTE_POS;
        let n = input.shape(0) / input.vector_size();
        let mut s = Vector::<f32, N>::new(0.0);
        let mut i = u;
        let mut end = n;
        let mut step = stride as usize;
        if runs {
            let first = u / crate::stream::RUN * per_run as usize;
            i = first + u % crate::stream::RUN;
            end = min(first + per_run as usize, n);
            step = crate::stream::RUN;
        }
        while i < end {
            s += input[i];
            i += step;
        }
        let mut total = 0.0f32;
        #[unroll]
        for l in 0..s.vector_size() {
            total += s.extract(l);
        }
        out[u] = total;
    }
}

/// A buffer to stream and the launch that reads it.
pub struct ReadProbe {
    input: burn_cubecl::tensor::CubeTensor,
    out: burn_cubecl::tensor::CubeTensor,
    cubes: u32,
}

/// A probe's rates: each order's median seconds per byte.
#[derive(Debug, Clone, Copy)]
pub struct ReadRates {
    /// Bytes one read covers.
    pub bytes: u64,
    pub grid_stride: f64,
    pub runs: f64,
}

impl ReadRates {
    /// The faster order's seconds per byte: the ceiling.
    pub fn best(&self) -> f64 {
        self.grid_stride.min(self.runs)
    }
}

impl ReadProbe {
    /// `values` f32 values (rounded down to a multiple of four), read by `cubes` cubes of 256
    /// units.
    pub fn new(values: usize, cubes: u32, device: &burn::tensor::Device) -> Result<Self, ShaderError> {
        let values = (values / 4).max(1) * 4;
        let input = cube_float(Tensor::<1>::ones([values], device))?;
        let out = cube_float(Tensor::<1>::zeros([(cubes * UNITS) as usize], device))?;
        Ok(Self { input, out, cubes })
    }

    /// Bytes one `queue` reads.
    pub fn bytes(&self) -> u64 {
        (self.input.meta.shape().num_elements() * DType::F32.size()) as u64
    }

    /// Queues one read of the whole buffer in `order`.
    pub fn queue(&self, order: Order) {
        let units = self.cubes * UNITS;
        // Vectors per run, a whole number of steps of `RUN`.
        let vectors = self.input.meta.shape().num_elements() / 4;
        let per_run = vectors.div_ceil(units as usize / RUN).div_ceil(RUN) * RUN;
        crate::launches::record(&CubeCount::Static(self.cubes, 1, 1), &CubeDim::new_1d(UNITS));
        read_kernel::launch(
            &self.input.client,
            CubeCount::Static(self.cubes, 1, 1),
            CubeDim::new_1d(UNITS),
            4,
            self.input.clone().into_tensor_arg(),
            self.out.clone().into_tensor_arg(),
            units,
            per_run as u32,
            order == Order::Runs,
        );
    }

    /// Streams `bytes` of a fresh buffer (read by 1024 cubes: enough that every core or SM has
    /// many, few enough that each unit reads a long run) `chain` times between two syncs, after
    /// one read that compiles the kernel, in each order, the orders' timings interleaved: the
    /// median seconds per byte of `repeats` timings of each.
    pub fn seconds_per_byte(
        device: &burn::tensor::Device,
        bytes: usize,
        chain: usize,
        repeats: usize,
    ) -> Result<ReadRates, ShaderError> {
        let sync = || device.sync().map_err(|e| ShaderError::Device(format!("reading a probe buffer: {e:?}")));
        let probe = Self::new((bytes / 4).max(4), 1024, device)?;
        let orders = [Order::GridStride, Order::Runs];
        let mut times = [Vec::with_capacity(repeats.max(1)), Vec::with_capacity(repeats.max(1))];
        orders.iter().for_each(|&order| probe.queue(order));
        sync()?;
        for _ in 0..repeats.max(1) {
            for (o, &order) in orders.iter().enumerate() {
                let start = Instant::now();
                (0..chain).for_each(|_| probe.queue(order));
                sync()?;
                times[o].push(start.elapsed().as_secs_f64());
            }
        }
        let per_byte = |t: &mut Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2] / (probe.bytes() * chain.max(1) as u64) as f64
        };
        let [mut grid, mut runs] = times;
        Ok(ReadRates { bytes: probe.bytes(), grid_stride: per_byte(&mut grid), runs: per_byte(&mut runs) })
    }

    /// The per-unit sums of the last read (each unit's share of a buffer of ones).
    pub fn sums(&self) -> Vec<f32> {
        crate::bridge::from_cube::<1>(self.out.clone()).into_data().try_to_vec::<f32>().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::{Order, ReadProbe};
    use crate::testing::device;

    /// Every value is read exactly once: the unit sums of a buffer of ones add up to its length.
    #[test]
    fn the_read_probe_reads_every_value_once() {
        for order in [Order::GridStride, Order::Runs] {
            for values in [4 * 1000 + 4, 4 * 7, 4 * 70_001] {
                let probe = ReadProbe::new(values, 2, &device()).unwrap();
                probe.queue(order);
                let total: f32 = probe.sums().iter().sum();
                assert_eq!(total, values as f32, "{order:?}, {values} values");
                assert_eq!(probe.bytes(), values as u64 * 4);
            }
        }
    }
}
