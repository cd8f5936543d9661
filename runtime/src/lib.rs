//! Ferry's runtime: load a Mixture-of-Experts model, run it on a wgpu GPU through burn, and
//! generate tokens.
//!
//! Data flows one way per token: ids -> embedding -> layers (attention, router, experts) ->
//! logits -> sampler -> events.

pub mod chat;
pub mod device;
pub mod engine;
pub mod error;
pub mod experts;
mod gemm;
pub mod graph;
pub mod lut;
pub mod measure;
pub mod options;
pub mod routing;
pub mod sampling;
pub mod spec;
pub mod weights;

pub use device::Gpu;
pub use error::{FerryError, Result};
pub use options::AdapterChoice;
pub use spec::ModelSpec;
