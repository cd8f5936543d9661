//! Expert uploads through Ferry's own mapped staging buffers instead of burn's `from_data`.
//!
//! A miss writes the expert's bytes, straight from the checkpoint's memory map where they are
//! what the slot holds, into a persistently allocated, host-visible staging buffer (a ring that
//! grows, up to 512 MiB, while every buffer still waits for its copy, so the host rarely waits
//! on the GPU), and one submission copies them into three scratch tensors that CubeCL owns; the
//! page's store kernel then transposes them into the slot as before. A prefetch borrows a
//! buffer as a `Ticket` that the upload thread fills, so the compute thread only records the
//! copy. burn's path goes through wgpu's internal staging
//! and a fresh allocation per upload; on lavapipe the mapped path copies at 2.7x its rate
//! (`ferry bench` prints both), but lavapipe runs the copy's submission on the submitting
//! thread, behind the kernels queued before it, so `--upload auto` keeps burn's path there.
//!
//! Ordering: CubeCL records kernels into its own encoder and submits them when it flushes. The
//! copy is a separate submission on the same queue, so CubeCL is flushed first: every kernel
//! queued earlier (the previous store, still reading the scratch; the launches still reading the
//! slot being replaced) is submitted before the copy, and every kernel queued later after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

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

/// A staging buffer's state: being copied from and mapped again, mapped for writing, failed
/// to map, or mapped and handed to the upload thread as a `Ticket`.
const PENDING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;
const RESERVED: u8 = 3;

/// Identifies a ring, so that a ticket from a ring since replaced is not submitted to another.
static RINGS: AtomicU64 = AtomicU64::new(0);

/// One staging buffer and its state.
struct Stage {
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
    submission: Option<wgpu::SubmissionIndex>,
}

/// A mapped staging buffer lent out of the ring, to be filled on another thread (the upload
/// thread writes a prefetched expert's bytes into it straight from the memory map) and then
/// handed back to `Staging::submit`. Dropped unsubmitted, its buffer returns to the ring.
pub struct Ticket {
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
    ring: u64,
    bytes: u64,
    filled: bool,
    submitted: bool,
}

impl Ticket {
    /// Writes the three projections (`bytes` each) into the mapped buffer.
    pub fn fill(&mut self, parts: [&[u8]; 3]) -> Result<()> {
        write_parts(&self.buffer, self.bytes, parts)?;
        self.filled = true;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.submitted {
            let _ = self.state.compare_exchange(RESERVED, READY, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Checks the projections' sizes and copies them into a mapped buffer, one after another.
fn write_parts(buffer: &wgpu::Buffer, bytes: u64, parts: [&[u8]; 3]) -> Result<()> {
    if parts.iter().any(|p| p.len() as u64 != bytes) {
        return Err(FerryError::Gpu(format!(
            "staging upload: projections of {:?} bytes for a ring of {bytes}",
            parts.map(<[u8]>::len),
        )));
    }
    let mut view = buffer.get_mapped_range_mut(..).map_err(|e| gpu_error("mapping", e))?;
    for (i, part) in parts.iter().enumerate() {
        let at = i * bytes as usize;
        view.slice(at..at + part.len()).copy_from_slice(part);
    }
    Ok(())
}

/// The staging ring and the scratch tensors its copies land in.
pub struct Staging {
    gpu: Gpu,
    ring: Vec<Stage>,
    next: usize,
    id: u64,
    /// Gate, up and down scratch `[words]`, and their wgpu buffers (held in place while held).
    scratch: [CubeTensor; 3],
    targets: [WgpuResource; 3],
    /// CubeCL's claims on the scratch allocations: held, they are never moved or reused.
    _held: Vec<Box<dyn std::any::Any + Send>>,
    /// Bytes of each projection.
    bytes: u64,
    /// Uploads made.
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
        let id = RINGS.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Self { gpu, ring, next: 0, id, scratch, targets, _held: held, bytes, uploads: 0 }))
    }

    /// Whether the ring may take one more buffer.
    fn may_grow(&self) -> bool {
        (self.ring.len() as u64 + 1) * 3 * self.bytes <= MAX_RING_BYTES
    }

    /// The index of a mapped buffer nobody holds, starting from the next in ring order; with
    /// `grow`, a new one while the ring is below its bound. Never waits.
    fn ready_stage(&mut self, grow: bool) -> Option<usize> {
        let _ = self.gpu.wgpu_device.poll(wgpu::PollType::Poll);
        let n = self.ring.len();
        let found = (0..n).map(|k| (self.next + k) % n).find(|&i| self.ring[i].state.load(Ordering::Acquire) == READY);
        let index = match found {
            Some(i) => i,
            None if grow && self.may_grow() => {
                self.ring.push(new_stage(&self.gpu, 3 * self.bytes));
                n
            }
            None => return None,
        };
        self.next = (index + 1) % self.ring.len();
        Some(index)
    }

    /// The index of a staging buffer to fill: one the GPU has copied out of, else a new one
    /// while the ring may grow, else the next one still being copied from, once its copy is
    /// done. None when every buffer is lent out as a ticket.
    fn free_stage(&mut self) -> Result<Option<usize>> {
        if let Some(index) = self.ready_stage(true) {
            return Ok(Some(index));
        }
        let n = self.ring.len();
        let state = |stage: &Stage| stage.state.load(Ordering::Acquire);
        let Some(index) = (0..n).map(|k| (self.next + k) % n).find(|&i| state(&self.ring[i]) != RESERVED) else {
            return Ok(None);
        };
        self.next = (index + 1) % n;
        let stage = &self.ring[index];
        loop {
            match state(stage) {
                READY => return Ok(Some(index)),
                FAILED => return Err(FerryError::Gpu("staging upload: a staging buffer failed to map".into())),
                _ => {
                    let wait = wgpu::PollType::Wait { submission_index: stage.submission.clone(), timeout: None };
                    self.gpu.wgpu_device.poll(wait).map_err(|e| gpu_error("waiting for a staging buffer", e))?;
                }
            }
        }
    }

    /// Lends a mapped staging buffer to be filled elsewhere, if one is free now (the ring
    /// grows as for an upload); None rather than waiting for the GPU.
    pub fn reserve(&mut self) -> Option<Ticket> {
        let index = self.ready_stage(true)?;
        let stage = &self.ring[index];
        stage.state.compare_exchange(READY, RESERVED, Ordering::AcqRel, Ordering::Acquire).ok()?;
        Some(Ticket {
            buffer: stage.buffer.clone(),
            state: Arc::clone(&stage.state),
            ring: self.id,
            bytes: self.bytes,
            filled: false,
            submitted: false,
        })
    }

    /// Copies the three projections (`bytes` each) into the scratch tensors, ordered after
    /// every kernel queued so far and before every kernel queued after; returns the scratch as
    /// `dtype` tensors `[bytes / 4]` for the page's store kernel. None when every staging
    /// buffer is lent out (the caller takes burn's path).
    pub fn upload(&mut self, parts: [&[u8]; 3], dtype: DType) -> Result<Option<[CubeTensor; 3]>> {
        let Some(index) = self.free_stage()? else { return Ok(None) };
        write_parts(&self.ring[index].buffer, self.bytes, parts)?;
        self.copy_out(index, dtype).map(Some)
    }

    /// Like `upload`, for a ticket filled elsewhere: only the copies are recorded here. None
    /// for a ticket of another ring or one never filled (the caller uploads another way).
    pub fn submit(&mut self, mut ticket: Ticket, dtype: DType) -> Result<Option<[CubeTensor; 3]>> {
        let index = self.ring.iter().position(|stage| Arc::ptr_eq(&stage.state, &ticket.state));
        let (Some(index), true, true) = (index, ticket.ring == self.id, ticket.filled) else { return Ok(None) };
        ticket.submitted = true;
        self.copy_out(index, dtype).map(Some)
    }

    /// Unmaps stage `index`, submits its copies into the scratch tensors, and maps it again
    /// for its next use once the GPU is done with it.
    fn copy_out(&mut self, index: usize, dtype: DType) -> Result<[CubeTensor; 3]> {
        let stage = &mut self.ring[index];
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
