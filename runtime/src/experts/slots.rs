//! The GPU memory behind the expert slots: a few large pages, each one buffer per projection
//! holding many slots, so that one kernel launch can read every expert a layer selected.
//!
//! Pages are sized to the adapter's largest binding and allocated when first used; the last
//! page holds only the remainder, so the slots never take more memory than the budget gave.

use std::collections::BTreeSet;

use burn::tensor::{DType, Device, Tensor, TensorData};

use burn_cubecl::tensor::CubeTensor;
use ferry_shaders::cube_float as float;
use ferry_shaders::expert::{Bf16Page, ExpertExtras, FloatPage, PackedPage, Work};

use super::staging::{Staging, Ticket};
use super::store::HostExpert;
use crate::error::{FerryError, Result};
use crate::options::{ExpertDtype, UploadPath};

/// Where an upload's bytes come from.
pub enum Upload<'a> {
    /// Converted (or quantised) on the host.
    Host(HostExpert),
    /// The checkpoint's own bytes, already what the slot holds (`ExpertStore::upload_bytes`).
    Mapped([&'a [u8]; 3]),
    /// A staging buffer the upload thread filled.
    Ring(Ticket),
}

impl Upload<'_> {
    /// The bytes a staging buffer takes: mapped or host f32/bf16; None when quantised or
    /// already in a staging buffer.
    pub fn parts(&self) -> Option<[&[u8]; 3]> {
        match self {
            Self::Host(host) => host.parts(),
            Self::Mapped(parts) => Some(*parts),
            Self::Ring(_) => None,
        }
    }
}

/// Where an expert sits on the GPU: its page, and its slot within the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRef {
    pub page: usize,
    pub slot: usize,
}

/// A block of expert slots: f32 or f16 in three GPU buffers (gate, up, down), bf16 words, or
/// quantised.
pub enum SlotPage {
    F32(Box<FloatPage>),
    Bf16(Box<Bf16Page>),
    Quant(Box<PackedPage>),
}

impl SlotPage {
    /// Allocates a page of `slots` experts stored as `dtype` on `like`'s device, uninitialised;
    /// f32 and f16 projections in `parts` buffers each (see `SlotPool::new`).
    pub fn new(like: &CubeTensor, slots: usize, hidden: usize, inter: usize, dtype: ExpertDtype, parts: usize) -> Self {
        match dtype.bits() {
            Some(bits) => Self::Quant(Box::new(PackedPage::new(like, slots, hidden, inter, bits, dtype.fp4()))),
            None if dtype == ExpertDtype::Bf16 => Self::Bf16(Box::new(Bf16Page::new(like, slots, hidden, inter))),
            None => {
                let half = dtype == ExpertDtype::F16;
                Self::F32(Box::new(FloatPage::split(like, slots, hidden, inter, half, parts)))
            }
        }
    }

    /// Uploads an expert and queues its copy into `slot`. Kernels queued earlier that read the
    /// slot's previous expert run first: the copy is ordered behind them on the same stream.
    pub fn store(&self, slot: usize, host: HostExpert, device: &Device) -> Result<()> {
        match (self, host) {
            (Self::F32(page), HostExpert::F32(weights)) => Ok(page.store(slot, weights, device)?),
            (Self::Bf16(page), HostExpert::Bf16(words)) => Ok(page.store(slot, words.each_ref().map(Vec::as_slice))?),
            (Self::Quant(page), HostExpert::Quant(e)) => Ok(page.store(slot, [&e.gate, &e.up, &e.down], device)?),
            _ => Err(FerryError::Gpu("an expert's format does not match its slot page's".into())),
        }
    }

    /// Queues the copy into `slot` of an expert already on the device (gate, up, down in
    /// checkpoint layout: f32 values or bf16 words, as the page stores them), ordered as `store`.
    pub fn store_device(&self, slot: usize, sources: [CubeTensor; 3]) -> Result<()> {
        match self {
            Self::F32(page) => Ok(page.store_device(slot, sources)?),
            Self::Bf16(page) => Ok(page.store_device(slot, sources)?),
            Self::Quant(_) => Err(FerryError::Gpu("a device copy into a page of packed slots".into())),
        }
    }

    /// Queues the grouped SwiGLU of `work` over this page: reads `x` `[tokens, hidden]`,
    /// writes `act` rows and the weighted expert outputs into `y` rows.
    #[allow(clippy::too_many_arguments)] // the kernel's buffers, passed through as they are
    pub fn swiglu(
        &self,
        x: &CubeTensor,
        work: Work<'_>,
        extras: &ExpertExtras,
        act: &CubeTensor,
        y: &CubeTensor,
        device: &Device,
    ) -> Result<()> {
        match self {
            Self::F32(page) => Ok(page.swiglu(x, work, extras, act, y, device)?),
            Self::Bf16(page) => Ok(page.swiglu(x, work, extras, act, y, device)?),
            Self::Quant(page) => Ok(page.swiglu(x, work, extras, act, y, device)?),
        }
    }
}

/// Largest page Ferry allocates even where the adapter allows more, in bytes (keeps 32-bit
/// element indices valid and allocations easy to place).
const PAGE_BYTES_CAP: u64 = 1 << 30;

pub struct SlotPool {
    device: Device,
    pages: Vec<Option<SlotPage>>,
    per_page: usize,
    total: usize,
    free: BTreeSet<usize>,
    hidden: usize,
    inter: usize,
    dtype: ExpertDtype,
    /// Buffers each f32/f16 projection is split into by output rows (1: none).
    parts: usize,
    upload: UploadPath,
    /// The staging ring, made on the first staged upload; None until then, or where this device
    /// or format cannot use one (`staging_tried`).
    staging: Option<Staging>,
    staging_tried: bool,
}

impl SlotPool {
    /// A pool of `total` slots for experts of `hidden` x `inter` projections stored as `dtype`,
    /// in pages of at most `page_bytes` per projection buffer. Fails when one projection is larger
    /// than a page and cannot be split (a packed or bf16 format, or sizes without a divisor that
    /// fits).
    pub fn new(
        device: &Device,
        total: usize,
        hidden: usize,
        inter: usize,
        dtype: ExpertDtype,
        page_bytes: Option<u64>,
    ) -> Result<Self> {
        let probe = float(Tensor::<1>::zeros([1], device))?;
        if dtype == ExpertDtype::F16
            && !probe.client.properties().supports_type(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F16))
        {
            return Err(FerryError::flag(
                "--expert-dtype",
                "f16 experts need an adapter with shader-f16; this one has none (use f32 or int8)",
            ));
        }
        let adapter = probe.client.properties().memory.max_page_size.min(PAGE_BYTES_CAP);
        let limit = page_bytes.map_or(adapter, |p| p.min(adapter));
        // The largest buffer of a page: f32 weights, or the packed codes. An f32 or f16
        // projection larger than a binding is split by output rows into the fewest parts that
        // fit (dividing both sizes); a row's sum stays whole, so the results do not change.
        let projection = (hidden * inter) as u64 * u64::from(dtype.weight_bits()) / 8;
        let splittable = matches!(dtype, ExpertDtype::F32 | ExpertDtype::F16);
        let parts = if projection <= limit {
            Some(1)
        } else if splittable {
            (2..=hidden.min(inter))
                .find(|&p| hidden.is_multiple_of(p) && inter.is_multiple_of(p) && projection / p as u64 <= limit)
        } else {
            None
        };
        let Some(parts) = parts else {
            return Err(FerryError::Gpu(format!(
                "one expert projection is {} KiB, more than the largest buffer for expert slots ({} KiB: \
                 the adapter's binding limit, or the page size asked for){}",
                projection >> 10,
                limit >> 10,
                if splittable { "" } else { "; f32 and f16 experts are split across buffers, this format is not" }
            )));
        };
        let part_bytes = projection / parts as u64;
        // A model without routed experts (MoLE) has zero-sized projections and no slots.
        let per_page = (limit / part_bytes.max(1)).max(1) as usize;
        Ok(Self {
            device: device.clone(),
            pages: Vec::new(),
            per_page,
            total,
            free: (0..total).collect(),
            hidden,
            inter,
            dtype,
            parts,
            upload: UploadPath::default(),
            staging: None,
            staging_tried: false,
        })
    }

    /// How experts are uploaded from now on.
    pub fn set_upload(&mut self, path: UploadPath) {
        if path != self.upload {
            self.upload = path;
            self.staging = None;
            self.staging_tried = false;
        }
    }

    /// Staged uploads made so far (the rest went through burn).
    pub fn staged_uploads(&self) -> u64 {
        self.staging.as_ref().map_or(0, |s| s.uploads)
    }

    /// The staging ring for this pool's experts: f32 experts in unsplit pages and bf16 ones,
    /// whose host bytes are what the slot holds; None for other formats, or where the device
    /// has no wgpu handles for Ferry.
    fn staging(&mut self) -> Result<Option<&mut Staging>> {
        if self.upload == UploadPath::Burn {
            return Ok(None);
        }
        if !self.staging_tried {
            self.staging_tried = true;
            if self.upload == UploadPath::Auto {
                let probe = float(Tensor::<1>::zeros([1], &self.device))?;
                if ferry_shaders::bridge::cpu_adapter(&probe.client) {
                    return Ok(None);
                }
            }
            let n = (self.hidden * self.inter) as u64;
            let bytes = match self.dtype {
                ExpertDtype::F32 if self.parts == 1 => Some(4 * n),
                ExpertDtype::Bf16 => Some(2 * n),
                _ => None,
            };
            if let Some(bytes) = bytes {
                self.staging = Staging::new(&self.device, bytes)?;
            }
        }
        Ok(self.staging.as_mut())
    }

    /// A free slot (the lowest, so placement is deterministic), or None when all are taken.
    pub fn take(&mut self) -> Option<usize> {
        self.free.pop_first()
    }

    pub fn release(&mut self, index: usize) {
        if index < self.total {
            self.free.insert(index);
        }
    }

    pub fn locate(&self, index: usize) -> SlotRef {
        SlotRef { page: index / self.per_page, slot: index % self.per_page }
    }

    /// Lends a mapped staging buffer for the upload thread to fill, where this pool uploads
    /// through the ring and one is free now.
    pub fn reserve(&mut self) -> Option<Ticket> {
        self.staging().ok().flatten()?.reserve()
    }

    /// The slot's page, allocated when first used.
    fn page_for(&mut self, at: SlotRef) -> Result<&SlotPage> {
        let (h, i) = (self.hidden, self.inter);
        if self.pages.len() <= at.page {
            self.pages.resize_with(at.page + 1, || None);
        }
        if self.pages[at.page].is_none() {
            let like = float(Tensor::<1>::from_data(TensorData::new(vec![0f32], [1]), &self.device))?;
            let slots = self.page_slots(at.page);
            self.pages[at.page] = Some(SlotPage::new(&like, slots, h, i, self.dtype, self.parts));
        }
        self.page(at.page)
    }

    /// The scratch tensors' element type for this pool's staged bytes.
    fn staged_dtype(&self) -> DType {
        if self.dtype == ExpertDtype::Bf16 { DType::U32 } else { DType::F32 }
    }

    /// Uploads an expert and queues its copy into slot `index`: staged when the pool uploads
    /// through the ring, else (and while every staging buffer is lent out) through burn.
    /// `Ok(None)` for a ticket that cannot be submitted here (its ring was replaced since): the
    /// caller uploads the expert again from the store.
    pub fn store(&mut self, index: usize, upload: Upload<'_>) -> Result<Option<SlotRef>> {
        let at = self.locate(index);
        self.page_for(at)?;
        let dtype = self.staged_dtype();
        if let Upload::Ring(ticket) = upload {
            let Some(staging) = self.staging()? else { return Ok(None) };
            let Some(sources) = staging.submit(ticket, dtype)? else { return Ok(None) };
            self.page(at.page)?.store_device(at.slot, sources)?;
            return Ok(Some(at));
        }
        if let Some(staging) = self.staging()?
            && let Some(parts) = upload.parts()
            && let Some(sources) = staging.upload(parts, dtype)?
        {
            self.page(at.page)?.store_device(at.slot, sources)?;
            return Ok(Some(at));
        }
        let host = match upload {
            Upload::Host(host) => host,
            Upload::Mapped(parts) if self.dtype == ExpertDtype::Bf16 => {
                HostExpert::Bf16(parts.map(bytemuck::pod_collect_to_vec))
            }
            Upload::Mapped(parts) => HostExpert::F32(parts.map(bytemuck::pod_collect_to_vec)),
            Upload::Ring(_) => return Ok(None),
        };
        self.page(at.page)?.store(at.slot, host, &self.device)?;
        Ok(Some(at))
    }

    pub fn page(&self, page: usize) -> Result<&SlotPage> {
        self.pages
            .get(page)
            .and_then(Option::as_ref)
            .ok_or_else(|| FerryError::Gpu(format!("expert slot page {page} is not allocated")))
    }

    /// Changes the number of slots. Returns the slots whose memory goes away (their experts
    /// must be dropped by the caller); pages that change size are freed.
    pub fn resize(&mut self, total: usize) -> Vec<usize> {
        let old = self.total;
        self.total = total;
        let mut gone = Vec::new();
        for page in 0..self.pages.len() {
            let first = page * self.per_page;
            let now = total.saturating_sub(first).min(self.per_page);
            let before = old.saturating_sub(first).min(self.per_page);
            if now != before {
                self.pages[page] = None;
                gone.extend(first..first + before);
            }
        }
        self.pages.truncate(total.div_ceil(self.per_page));
        self.free = (0..total).collect();
        gone
    }

    /// Marks every slot free (the pages stay allocated).
    pub fn clear(&mut self) {
        self.free = (0..self.total).collect();
    }

    /// Removes `index` from the free set (the caller keeps an expert there).
    pub fn keep(&mut self, index: usize) {
        self.free.remove(&index);
    }

    fn page_slots(&self, page: usize) -> usize {
        self.total.saturating_sub(page * self.per_page).min(self.per_page)
    }
}
