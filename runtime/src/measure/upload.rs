//! How fast wgpu moves host bytes into GPU buffers on this adapter, by each path the expert
//! manager could use. wgpu has no host-visible storage binding: every path goes through a
//! staging copy somewhere.

use std::time::Instant;

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Tensor, TensorData};

use crate::device::Gpu;
use crate::error::{FerryError, Result};

/// One upload path's measured throughput.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadMeasurement {
    pub method: &'static str,
    /// Bytes per upload.
    pub bytes: u64,
    pub uploads: usize,
    /// Median seconds of one upload, from the call to the GPU having the data.
    pub median_seconds: f64,
    /// Bytes per second at the median.
    pub bytes_per_second: f64,
}

fn summarise(method: &'static str, bytes: usize, mut times: Vec<f64>) -> UploadMeasurement {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    UploadMeasurement {
        method,
        bytes: bytes as u64,
        uploads: times.len(),
        median_seconds: median,
        bytes_per_second: bytes as f64 / median,
    }
}

/// Seconds of each of `repeats` `Queue::write_buffer` uploads of `data`, until the GPU has it.
fn time_write_buffer(gpu: &Gpu, target: &wgpu::Buffer, data: &[u8], repeats: usize) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        gpu.queue.write_buffer(target, 0, data);
        gpu.queue.submit([]);
        wait(gpu)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn wait(gpu: &Gpu) -> Result<()> {
    gpu.wgpu_device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| FerryError::Gpu(e.to_string()))
}

/// Uploads `bytes` (rounded to a multiple of 4) `repeats` times by each path:
/// - `write_buffer`: `Queue::write_buffer` into a storage buffer (wgpu's internal staging);
/// - `mapped_staging`: a persistent MAP_WRITE staging buffer, remapped each time, then a
///   buffer-to-buffer copy;
/// - `write_buffer_thread`: `write_buffer` issued from a background thread;
/// - `burn_from_data`: `Tensor::from_data` and a device sync (what the expert cache does now).
pub fn measure_upload(gpu: &Gpu, bytes: usize, repeats: usize) -> Result<Vec<UploadMeasurement>> {
    let bytes = bytes.max(4) / 4 * 4;
    let repeats = repeats.max(1);
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let device = &gpu.wgpu_device;
    let queue = &gpu.queue;
    let target = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("ferry-bandwidth-target"),
        size: bytes as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut results = Vec::new();

    results.push(summarise("write_buffer", bytes, time_write_buffer(gpu, &target, &data, repeats)?));

    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("ferry-bandwidth-staging"),
        size: bytes as u64,
        usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: true,
    });
    let mut times = Vec::new();
    for i in 0..repeats {
        let start = Instant::now();
        if i > 0 {
            staging.map_async(wgpu::MapMode::Write, .., |_| {});
            wait(gpu)?;
        }
        staging.get_mapped_range_mut(..).map_err(|e| FerryError::Gpu(e.to_string()))?.copy_from_slice(&data);
        staging.unmap();
        let mut encoder =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ferry-bandwidth-copy") });
        encoder.copy_buffer_to_buffer(&staging, 0, &target, 0, bytes as u64);
        queue.submit([encoder.finish()]);
        wait(gpu)?;
        times.push(start.elapsed().as_secs_f64());
    }
    results.push(summarise("mapped_staging", bytes, times));

    let times = std::thread::scope(|scope| {
        scope
            .spawn(|| time_write_buffer(gpu, &target, &data, repeats))
            .join()
            .map_err(|_| FerryError::Gpu("upload thread panicked".into()))?
    })?;
    results.push(summarise("write_buffer_thread", bytes, times));

    let floats: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut times = Vec::new();
    for _ in 0..repeats {
        let values = floats.clone();
        let start = Instant::now();
        let tensor = Tensor::<1>::from_data(TensorData::new(values, [bytes / 4]), &gpu.device);
        gpu.device.sync().map_err(|e| FerryError::Gpu(format!("{e:?}")))?;
        times.push(start.elapsed().as_secs_f64());
        drop(tensor);
    }
    results.push(summarise("burn_from_data", bytes, times));
    Ok(results)
}
