//! Model weights on the host: memory-mapped safetensors shards, looked up by HuggingFace name.
//!
//! Nothing is copied at open time; a tensor's bytes are read from the mapping when a caller asks
//! for them, so expert bytes can later be streamed straight from the page cache.

mod dtype;
mod shards;

pub use dtype::{SourceDtype, to_f32};
pub use shards::{TensorRef, WeightStore};
