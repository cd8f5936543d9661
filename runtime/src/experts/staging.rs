//! Expert uploads through Ferry's own mapped staging buffers instead of burn's `from_data`.
//!
//! A miss writes the expert's bytes into a persistently allocated, host-visible staging buffer
//! (a ring that grows, up to 512 MiB, while every buffer still waits for its copy, so the host
//! rarely waits on the GPU), and one
//! submission copies them into three scratch tensors that CubeCL owns; the page's store kernel
//! then transposes them into the slot as before. burn's path goes through wgpu's internal staging
//! and a fresh allocation per upload; on lavapipe the mapped path copies at 2.7x its rate
//! (`ferry bench` prints both), but lavapipe runs the copy's submission on the submitting
//! thread, behind the kernels queued before it, so `--upload auto` keeps burn's path there.
//!
//! Ordering: CubeCL records kernels into its own encoder and submits them when it flushes. The
//! copy is a separate submission on the same queue, so CubeCL is flushed first: every kernel
//! queued earlier (the previous store, still reading the scratch; the launches still reading the
//! slot being replaced) is submitted before the copy, and every kernel queued later after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::wgpu::wgpu;
use burn::tensor::{DType, Device, Tensor};
use burn_cubecl::tensor::CubeTensor;
use cubecl::wgpu::{AutoCompiler, WgpuResource, WgpuServer};

use crate::device::Gpu;
use crate::error::{FerryError, Result};

/// Host-visible bytes the ring may grow to: a miss takes a free buffer, or a new one while the
/// ring is below this, and only then waits for the oldest copy (a host sync on the queue).
const MAX_RING_BYTES: u64 = 512 << 20;
/// Largest expert (all three projections) that goes through staging; larger ones keep burn's
/// path rather than pin that much host-visible memory.
pub const MAX_STAGED_BYTES: u64 = 256 << 20;

/// A staging buffer's state: being copied from and mapped again, mapped for writing, or failed
/// to map.
const PENDING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// One staging buffer and its state.
struct Stage {
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
    submission: Option<wgpu::SubmissionIndex>,
}

/// The staging ring and the scratch tensors its copies land in.
pub struct Staging {
    gpu: Gpu,
    ring: Vec<Stage>,
    next: usize,
    /// Gate, up and down scratch `[words]`, and their wgpu buffers (held in place while held).
    scratch: [CubeTensor; 3],
    targets: [WgpuResource; 3],
    /// CubeCL's claims on the scratch allocations: held, they are never moved or reused.
    _held: Vec<Box<dyn std::any::Any + Send>>,
    /// Bytes of each projection.
    bytes: u64,
    /// Uploads made, and bytes.
    pub uploads: u64,
}

/// A staging buffer of `size` bytes, mapped for writing.
fn new_stage(gpu: &Gpu, size: u64) -> Stage {
    Stage {
        buffer: gpu.wgpu_device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("ferry-expert-staging"),
            size,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        }),
        state: Arc::new(AtomicU8::new(READY)),
        submission: None,
    }
}

fn gpu_error(what: &str, e: impl std::fmt::Debug) -> FerryError {
    FerryError::Gpu(format!("staging upload: {what}: {e:?}"))
}

impl Staging {
    /// A ring for experts of three projections of `bytes` each on `device`; None where the
    /// device was not opened through `Gpu::open` (no wgpu handles to use), is not wgpu, or the
    /// expert is too large to stage.
    pub fn new(device: &Device, bytes: u64) -> Result<Option<Self>> {
        if bytes == 0 || !bytes.is_multiple_of(4) || 3 * bytes > MAX_STAGED_BYTES {
            return Ok(None);
        }
        let Some(gpu) = Gpu::of_device(device) else { return Ok(None) };
        let words = (bytes / 4) as usize;
        let make = || ferry_shaders::cube_float(Tensor::<1>::zeros([words], device));
        let scratch = [make()?, make()?, make()?];
        let mut targets = Vec::with_capacity(3);
        let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::with_capacity(3);
        for t in &scratch {
            match t.client.get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone()) {
                Ok(managed) => {
                    targets.push(managed.resource().clone());
                    held.push(Box::new(managed));
                }
                // Another CubeCL runtime (or compiler) behind this device: keep burn's path.
                Err(_) => return Ok(None),
            }
        }
        let Ok(targets) = <[WgpuResource; 3]>::try_from(targets) else { return Ok(None) };
        let ring = vec![new_stage(&gpu, 3 * bytes)];
        Ok(Some(Self { gpu, ring, next: 0, scratch, targets, _held: held, bytes, uploads: 0 }))
    }

    /// The index of a staging buffer to fill: the next one if the GPU has copied out of it, else
    /// a new one while the ring may grow, else the next one once its copy is done.
    fn free_stage(&mut self) -> Result<usize> {
        let _ = self.gpu.wgpu_device.poll(wgpu::PollType::Poll);
        let next = self.next;
        let state = |stage: &Stage| stage.state.load(Ordering::Acquire);
        if state(&self.ring[next]) != READY && (self.ring.len() as u64 + 1) * 3 * self.bytes <= MAX_RING_BYTES {
            self.ring.insert(next, new_stage(&self.gpu, 3 * self.bytes));
        }
        self.next = (next + 1) % self.ring.len();
        let stage = &self.ring[next];
        loop {
            match state(stage) {
                READY => return Ok(next),
                FAILED => return Err(FerryError::Gpu("staging upload: a staging buffer failed to map".into())),
                _ => {
                    let wait = wgpu::PollType::Wait { submission_index: stage.submission.clone(), timeout: None };
                    self.gpu.wgpu_device.poll(wait).map_err(|e| gpu_error("waiting for a staging buffer", e))?;
                }
            }
        }
    }

    /// Copies the three projections (`bytes` each) into the scratch tensors, ordered after
    /// every kernel queued so far and before every kernel queued after; returns the scratch as
    /// `dtype` tensors `[bytes / 4]` for the page's store kernel.
    pub fn upload(&mut self, parts: [&[u8]; 3], dtype: DType) -> Result<[CubeTensor; 3]> {
        if parts.iter().any(|p| p.len() as u64 != self.bytes) {
            return Err(FerryError::Gpu(format!(
                "staging upload: projections of {:?} bytes for a ring of {}",
                parts.map(<[u8]>::len),
                self.bytes
            )));
        }
        let index = self.free_stage()?;
        let stage = &mut self.ring[index];
        {
            let mut view = stage.buffer.get_mapped_range_mut(..).map_err(|e| gpu_error("mapping", e))?;
            for (i, part) in parts.iter().enumerate() {
                let at = i * self.bytes as usize;
                view.slice(at..at + part.len()).copy_from_slice(part);
            }
        }
        stage.buffer.unmap();
        self.scratch[0].client.flush().map_err(|e| gpu_error("flushing queued kernels", e))?;
        let mut encoder = self
            .gpu
            .wgpu_device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ferry-expert-upload") });
        for (i, target) in self.targets.iter().enumerate() {
            encoder.copy_buffer_to_buffer(
                &stage.buffer,
                i as u64 * self.bytes,
                &target.buffer,
                target.offset,
                self.bytes,
            );
        }
        stage.submission = Some(self.gpu.queue.submit([encoder.finish()]));
        stage.state.store(PENDING, Ordering::Release);
        let state = Arc::clone(&stage.state);
        stage.buffer.map_async(wgpu::MapMode::Write, .., move |mapped| {
            state.store(if mapped.is_ok() { READY } else { FAILED }, Ordering::Release)
        });
        self.uploads += 1;
        Ok(self.scratch.each_ref().map(|t| {
            CubeTensor::new_contiguous(
                t.client.clone(),
                t.device.clone(),
                t.meta.shape().clone(),
                t.handle.clone(),
                dtype,
            )
        }))
    }
}
