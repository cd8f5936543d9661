//! The forward pass as a burn graph on the wgpu device: embedding -> decoder layers -> logits.
//!
//! Reads top to bottom as a story: `Model::forward` embeds the tokens, runs each layer's
//! attention and feed-forward (dense or mixture of experts) with residuals, and projects to logits.

mod attention;
mod ffn;
mod kv_cache;
mod linear;
mod model;
mod moe;
mod norm;
mod rope;

pub use kv_cache::KvCache;
pub use model::{ExpertOptions, ForwardOutput, LogitsFor, Model, PrefetchMode};
