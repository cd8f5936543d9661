//! The forward pass as a burn graph on the wgpu device: embedding -> decoder layers -> logits.
//!
//! Reads top to bottom as a story: `Model::forward` embeds the tokens, runs each layer's
//! attention and feed-forward (dense, mixture of experts or mixture of lookup experts) with residuals, and projects to logits.

mod attention;
mod blocked;
mod ffn;
mod kv_cache;
mod linear;
mod mla;
mod model;
mod moe;
mod mole;
mod mole_table;
mod predictor;
mod residual;
mod rope;
mod vocab;

pub use attention::attention_scratch_bytes;
pub use kv_cache::KvCache;
pub use linear::stored_dense_dtype;
pub use model::{ForwardOutput, LogitsFor, Model};
pub use mole_table::{lookup_header, write_lookup_table};
pub use predictor::{FittedMap, LayerPredictor, PREDICTOR_FILE, fit_ridge, write_predictor};
pub use residual::{Head, HiddenLayer, Training, fit_hidden};

/// A tensor read back to the host as f32 values, errors naming `what` on one line.
fn read_f32<const D: usize>(tensor: burn::tensor::Tensor<D>, what: &str) -> crate::error::Result<Vec<f32>> {
    tensor
        .try_into_data()
        .map_err(|e| crate::error::FerryError::gpu_read(what, e))?
        .try_into_vec()
        .map_err(|e| crate::error::FerryError::Gpu(format!("reading {what}: {e:?}")))
}
