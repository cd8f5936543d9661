//! How fast wgpu moves host bytes into GPU buffers on this adapter, by each path the expert
//! manager could use. wgpu has no host-visible storage binding: every path goes through a
//! staging copy somewhere.

use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

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

/// `repeats` uploads of `data` through a ring of three mapped staging buffers: a host thread
/// writes each free buffer and passes it over; this thread unmaps it, records its copy into
/// `target` and maps it again. Seconds per upload over the whole run, until the GPU has the last.
fn time_ring_thread(gpu: &Gpu, target: &wgpu::Buffer, data: &[u8], repeats: usize) -> Result<UploadMeasurement> {
    const RING: usize = 3;
    let bytes = data.len() as u64;
    let ring: Vec<wgpu::Buffer> = (0..RING)
        .map(|_| {
            gpu.wgpu_device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("ferry-bandwidth-ring"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            })
        })
        .collect();
    let (free_tx, free_rx) = channel::<usize>();
    let (full_tx, full_rx) = channel::<usize>();
    for i in 0..RING {
        let _ = free_tx.send(i);
    }
    let start = Instant::now();
    let ring = &ring;
    std::thread::scope(|scope| -> Result<()> {
        // The filler owns its channel ends, so that its end (or error) ends this thread's wait.
        let filler = scope.spawn(move || -> Result<()> {
            for _ in 0..repeats {
                // A buffer is free once its remap completes, which a poll delivers: poll without
                // blocking the device for the other thread's submissions meanwhile.
                let i = loop {
                    match free_rx.recv_timeout(Duration::from_micros(50)) {
                        Ok(i) => break i,
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = gpu.wgpu_device.poll(wgpu::PollType::Poll);
                        }
                        Err(RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                };
                ring[i].get_mapped_range_mut(..).map_err(|e| FerryError::Gpu(e.to_string()))?.copy_from_slice(data);
                if full_tx.send(i).is_err() {
                    break;
                }
            }
            Ok(())
        });
        for _ in 0..repeats {
            let Ok(i) = full_rx.recv() else { break };
            ring[i].unmap();
            let mut encoder = gpu
                .wgpu_device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ferry-bandwidth-ring") });
            encoder.copy_buffer_to_buffer(&ring[i], 0, target, 0, bytes);
            gpu.queue.submit([encoder.finish()]);
            let free = free_tx.clone();
            // A failed map is passed on too: the filler's write then reports it.
            ring[i].map_async(wgpu::MapMode::Write, .., move |_| {
                let _ = free.send(i);
            });
        }
        drop(full_rx);
        filler.join().map_err(|_| FerryError::Gpu("upload thread panicked".into()))?
    })?;
    wait(gpu)?;
    let seconds = start.elapsed().as_secs_f64() / repeats as f64;
    Ok(UploadMeasurement {
        method: "mapped_ring_thread",
        bytes,
        uploads: repeats,
        median_seconds: seconds,
        bytes_per_second: bytes as f64 / seconds,
    })
}

fn wait(gpu: &Gpu) -> Result<()> {
    gpu.wgpu_device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| FerryError::Gpu(e.to_string()))
}

/// Uploads `bytes` (rounded to a multiple of 4) `repeats` times by each path:
/// - `write_buffer`: `Queue::write_buffer` into a storage buffer (wgpu's internal staging);
/// - `mapped_staging`: a persistent MAP_WRITE staging buffer, remapped each time, then a
///   buffer-to-buffer copy;
/// - `write_buffer_thread`: `write_buffer` issued from a background thread;
/// - `mapped_ring_thread`: three persistently mapped staging buffers that a host thread fills
///   while this thread only records the copies, uploads back to back (what a prefetch does with
///   the expert cache's ring); its time is the run's per upload, not a median;
/// - `burn_from_data`: `Tensor::from_data` and a device sync (the cache's path on a CPU adapter).
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

    results.push(time_ring_thread(gpu, &target, &data, repeats)?);

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
