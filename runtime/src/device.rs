//! GPU selection: which wgpu adapter Ferry computes on, and what it offers.
//!
//! Burn's wgpu runtime acquires the device (it knows which features its shader compilers need);
//! Ferry chooses the adapter, keeps the wgpu handles for its own buffers, and reports them.

use std::sync::{Mutex, OnceLock};

use burn::tensor::wgpu::{WgpuSetup, wgpu};
use burn::tensor::{Device, DeviceKind};

use crate::error::{FerryError, Result};
use crate::options::AdapterChoice;

impl AdapterChoice {
    fn device_kind(self) -> DeviceKind {
        match self {
            Self::Default => DeviceKind::DefaultDevice,
            Self::Discrete(i) => DeviceKind::DiscreteGpu(i),
            Self::Integrated(i) => DeviceKind::IntegratedGpu(i),
            Self::Virtual(i) => DeviceKind::VirtualGpu(i),
            Self::Cpu => DeviceKind::Cpu,
        }
    }
}

/// What an adapter is, for users and reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub shader_f16: bool,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    pub max_compute_workgroups_per_dimension: u32,
}

impl AdapterSummary {
    fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let limits = adapter.limits();
        Self {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        }
    }
}

/// Every adapter wgpu can see on this machine, on every backend.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::all();
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters.iter().map(AdapterSummary::of).collect()
}

/// Device memory measured through wgpu's allocator (Vulkan, DX12).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GpuMemory {
    /// Bytes of live allocations.
    pub allocated_bytes: u64,
    /// Bytes of the memory blocks they are carved from (what the device has given the process).
    pub reserved_bytes: u64,
}

/// A GPU ready for Ferry: burn's device for the graph and the raw wgpu handles for Ferry's own
/// buffers, sharing one wgpu device.
#[derive(Clone)]
pub struct Gpu {
    pub device: Device,
    pub adapter: AdapterSummary,
    pub wgpu_device: wgpu::Device,
    pub queue: wgpu::Queue,
}

/// Burn registers each wgpu runtime process-wide and refuses to initialise one twice, so opened
/// GPUs are remembered here and handed out again (tests open the GPU from many threads).
fn opened() -> &'static Mutex<Vec<(AdapterChoice, Gpu)>> {
    static OPENED: OnceLock<Mutex<Vec<(AdapterChoice, Gpu)>>> = OnceLock::new();
    OPENED.get_or_init(|| Mutex::new(Vec::new()))
}

impl Gpu {
    /// Opens the chosen adapter. Fails with [`FerryError::NoAdapter`] when none matches.
    pub fn open(choice: AdapterChoice) -> Result<Self> {
        let mut opened = opened().lock().map_err(|_| FerryError::Gpu("GPU registry poisoned".into()))?;
        if let Some((_, gpu)) = opened.iter().find(|(c, _)| *c == choice) {
            return Ok(gpu.clone());
        }
        let mut options = Device::wgpu_options();
        if choice != AdapterChoice::Default {
            options = options.device_kind(choice.device_kind());
        }
        let (device, setup): (Device, WgpuSetup) =
            options.init_with_setup().map_err(|e| FerryError::NoAdapter(format!("{choice:?}: {e}")))?;
        let gpu =
            Gpu { device, adapter: AdapterSummary::of(&setup.adapter), wgpu_device: setup.device, queue: setup.queue };
        opened.push((choice, gpu.clone()));
        Ok(gpu)
    }

    /// The GPU opened through `open` whose burn device is `device`: Ferry's wgpu handles for the
    /// buffers it manages itself (staging uploads). None for a device opened elsewhere.
    pub fn of_device(device: &Device) -> Option<Gpu> {
        let opened = opened().lock().ok()?;
        opened.iter().find(|(_, gpu)| &gpu.device == device).map(|(_, gpu)| gpu.clone())
    }

    /// GPU memory wgpu's allocator holds for this device right now (all of the process's tensors,
    /// pools and staging buffers): None where the backend keeps no report (Metal, GL).
    pub fn memory(&self) -> Option<GpuMemory> {
        self.wgpu_device
            .generate_allocator_report()
            .map(|r| GpuMemory { allocated_bytes: r.total_allocated_bytes, reserved_bytes: r.total_reserved_bytes })
    }

    /// One line naming the adapter, for logs and reports.
    pub fn describe(&self) -> String {
        format!("{} ({}, {})", self.adapter.name, self.adapter.backend, self.adapter.device_type)
    }
}
