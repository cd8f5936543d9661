//! The decode roofline: the fastest a decode step could be if it only had to read its weights
//! and KV cache at this adapter's measured memory bandwidth, and upload its missed experts at
//! the measured upload rate. `ferry bench` prints achieved / ceiling for every mode.

use std::time::Instant;

use burn::tensor::Tensor;

use ferry_shaders::stream::ReadProbe;

use crate::device::Gpu;
use crate::error::{FerryError, Result};
use crate::options::{DenseDtype, ExpertDtype};
use crate::spec::{FfnKind, ModelSpec};

/// Ferry computes in f32: norms, biases and cached K/V values are 4 bytes (projections and
/// experts are counted in their stored formats).
const BYTES_PER_VALUE: u64 = 4;

/// Bytes one decode step reads from GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DecodeBytes {
    /// Attention, norms, routers, shared experts, dense FFNs, the LM head and one embedding row.
    pub dense: u64,
    /// The routed experts the token computes, in their stored format.
    pub experts: u64,
    /// K and V of every earlier position in every layer.
    pub kv_cache: u64,
}

impl DecodeBytes {
    /// For a token with `position` tokens before it, computing `experts_per_layer` routed
    /// experts in each MoE layer (top-k in full mode, fewer for little tokens) stored as `dtype`,
    /// with projection matrices stored as `projections`.
    pub fn of(
        spec: &ModelSpec,
        position: usize,
        experts_per_layer: f64,
        dtype: ExpertDtype,
        projections: DenseDtype,
    ) -> Self {
        let hidden = spec.hidden_size as u64;
        let embedding = spec.vocab_size as u64 * hidden;
        // An untied embedding is read one row per token; tied, the LM head reads all of it.
        let unread = if spec.tie_word_embeddings { 0 } else { embedding - hidden };
        let matrices = spec.projection_params() as u64;
        let rest = spec.resident_params() as u64 - unread - matrices;
        let dense = matrices * projections.bytes() + rest * BYTES_PER_VALUE;
        let moe_layers = spec.layers.iter().filter(|l| matches!(l, FfnKind::Moe)).count() as f64;
        let expert = dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size) as f64;
        let experts = (experts_per_layer * moe_layers * expert).round() as u64;
        let kv = spec.attention.kv_elements(spec.num_layers(), position) as u64;
        Self { dense, experts, kv_cache: kv * BYTES_PER_VALUE }
    }

    pub fn total(&self) -> u64 {
        self.dense + self.experts + self.kv_cache
    }
}

/// Tokens per second a decode step reading `read` bytes at `memory_bytes_per_second` and
/// uploading `uploaded` bytes at `upload_bytes_per_second` (serially: the worst case) could reach.
pub fn ceiling_tokens_per_second(
    read: u64,
    memory_bytes_per_second: f64,
    uploaded: f64,
    upload_bytes_per_second: f64,
) -> f64 {
    let seconds = read as f64 / memory_bytes_per_second + uploaded / upload_bytes_per_second;
    if seconds > 0.0 { 1.0 / seconds } else { f64::INFINITY }
}

/// A measured GPU memory bandwidth.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryBandwidth {
    /// Bytes of the buffer streamed.
    pub bytes: u64,
    /// Bytes read per second by a plain streaming-read kernel (median), in the faster of its
    /// two orders: the ceiling a decode step, which reads weights and writes little, is
    /// measured against.
    pub bytes_per_second: f64,
    /// The read kernel in a GPU's coalesced order (the whole launch one stretch per step).
    pub grid_stride_bytes_per_second: f64,
    /// The read kernel in runs (eight neighbouring units per contiguous stretch: a CPU
    /// adapter's SIMD batch, and the panelled expert slots' order).
    pub runs_bytes_per_second: f64,
    /// Bytes read plus written per second by an elementwise burn kernel (median), the probe
    /// Ferry used before the read kernel: lower where writes cost as much as reads.
    pub elementwise_bytes_per_second: f64,
    /// Bytes per second the host's cores read from host RAM together (median): on a CPU
    /// adapter, the machine's own ceiling, which the adapter shares.
    pub host_read_bytes_per_second: f64,
}

/// Launches chained between two syncs in the GPU probes: launch and sync cost is spread over
/// the chain, so the figure approaches what a long decode kernel could read.
const CHAIN: usize = 8;

/// The median of `repeats` timings of `run`.
fn median_seconds(repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Streams a buffer of `bytes` `CHAIN` times between two syncs, `repeats` times, through a plain
/// read kernel and through an elementwise kernel (read once, written once), and reads as many
/// bytes of host RAM on every core; reports the median rates.
pub fn measure_memory_bandwidth(gpu: &Gpu, bytes: usize, repeats: usize) -> Result<MemoryBandwidth> {
    let values = (bytes / 4).max(4);
    let sync = || gpu.device.sync().map_err(|e| FerryError::Gpu(format!("memory bandwidth: {e:?}")));
    let read = ReadProbe::seconds_per_byte(&gpu.device, bytes, CHAIN, repeats)?;
    let mut x = Tensor::<1>::ones([values], &gpu.device);
    x = x * 1.0;
    sync()?;
    let elementwise = median_seconds(repeats, || {
        for _ in 0..CHAIN {
            x = x.clone() * 1.0;
        }
        sync()
    })?;
    Ok(MemoryBandwidth {
        bytes: read.bytes,
        bytes_per_second: 1.0 / read.best(),
        grid_stride_bytes_per_second: 1.0 / read.grid_stride,
        runs_bytes_per_second: 1.0 / read.runs,
        elementwise_bytes_per_second: (2 * values as u64 * 4 * CHAIN as u64) as f64 / elementwise,
        host_read_bytes_per_second: host_read_bandwidth(bytes, repeats),
    })
}

/// Bytes per second every core together reads from a host buffer of `bytes` (median of
/// `repeats`), each core summing its own contiguous share.
pub fn host_read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let words = vec![1u64; (bytes / 8).max(1)];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = words.len().div_ceil(threads);
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) + 1 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = words
                .chunks(share)
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
                .collect();
            parts.into_iter().map(|p| p.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        times.push(start.elapsed().as_secs_f64());
    }
    // The first pass also faults the pages in.
    times.remove(0);
    times.sort_by(f64::total_cmp);
    (words.len() * 8) as f64 / times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_adds_read_and_upload_time() {
        // 1 GB read at 100 GB/s (10 ms) plus 10 MB uploaded at 1 GB/s (10 ms): 50 tokens/s.
        let t = ceiling_tokens_per_second(1_000_000_000, 100e9, 10e6, 1e9);
        assert!((t - 50.0).abs() < 1e-9, "{t}");
    }
}
