//! Measurements for reports and benchmarks: host-to-GPU upload paths, the GPU's memory
//! bandwidth and the decode roofline, and the process's memory.

pub mod memory;
pub mod roofline;
pub mod upload;

pub use upload::{UploadMeasurement, measure_upload};
