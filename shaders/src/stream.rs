//! A plain streaming read: every unit sums its share of a buffer, 16 bytes per load, neighbouring
//! units at neighbouring addresses, and writes one value. It reads each byte once and writes
//! almost nothing, so its rate is the adapter's own read ceiling: the figure a decode step,
//! which only reads weights, is measured against.

use std::time::Instant;

use burn::tensor::{DType, Tensor};
use cubecl::{CubeCount, CubeDim};

use self::kernel::read_kernel;

use crate::bridge::{ShaderError, cube_float};

/// Units per cube.
const UNITS: u32 = 256;

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// `out[u] = sum of input[u + k * stride]` over every `k` in range, lanes added in order.
    #[cube(launch)]
    pub(super) fn read_kernel<N: Size>(input: &Tensor<Vector<f32, N>>, out: &mut Tensor<f32>, stride: u32) {
        let u = ABSOLUTE_POS;
        let n = input.shape(0) / input.vector_size();
        let step = stride as usize;
        let mut s = Vector::<f32, N>::new(0.0);
        let mut i = u;
        while i < n {
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

    /// Queues one read of the whole buffer.
    pub fn queue(&self) {
        let units = self.cubes * UNITS;
        crate::launches::record(&CubeCount::Static(self.cubes, 1, 1), &CubeDim::new_1d(UNITS));
        read_kernel::launch(
            &self.input.client,
            CubeCount::Static(self.cubes, 1, 1),
            CubeDim::new_1d(UNITS),
            4,
            self.input.clone().into_tensor_arg(),
            self.out.clone().into_tensor_arg(),
            units,
        );
    }

    /// Streams `bytes` of a fresh buffer (read by 1024 cubes: enough that every core or SM has
    /// many, few enough that each unit reads a long run) `chain` times between two syncs, after
    /// one read that compiles the kernel: the bytes one read covers and the median seconds per
    /// byte of `repeats` timings.
    pub fn seconds_per_byte(
        device: &burn::tensor::Device,
        bytes: usize,
        chain: usize,
        repeats: usize,
    ) -> Result<(u64, f64), ShaderError> {
        let sync = || device.sync().map_err(|e| ShaderError::Device(format!("reading a probe buffer: {e:?}")));
        let probe = Self::new((bytes / 4).max(4), 1024, device)?;
        probe.queue();
        sync()?;
        let mut times = Vec::with_capacity(repeats.max(1));
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            (0..chain).for_each(|_| probe.queue());
            sync()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok((probe.bytes(), times[times.len() / 2] / (probe.bytes() * chain.max(1) as u64) as f64))
    }

    /// The per-unit sums of the last read (each unit's share of a buffer of ones).
    pub fn sums(&self) -> Vec<f32> {
        crate::bridge::from_cube::<1>(self.out.clone()).into_data().try_to_vec::<f32>().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::ReadProbe;
    use crate::testing::device;

    /// Every value is read exactly once: the unit sums of a buffer of ones add up to its length.
    #[test]
    fn the_read_probe_reads_every_value_once() {
        let probe = ReadProbe::new(4 * 1000 + 4, 2, &device()).unwrap();
        probe.queue();
        let total: f32 = probe.sums().iter().sum();
        assert_eq!(total, 4004.0);
        assert_eq!(probe.bytes(), 4004 * 4);
    }
}
