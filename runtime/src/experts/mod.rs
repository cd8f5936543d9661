//! The expert manager: routed experts live in host memory (the memory-mapped checkpoint) and a
//! cache of expert slots on the GPU holds as many as the VRAM budget allows. A miss uploads the
//! expert into a free or evicted slot before its layer computes.

mod bandwidth;
mod budget;
mod cache;
mod policy;
mod select;
mod stats;
mod store;
mod transfer;

pub use bandwidth::{UploadMeasurement, measure_upload};
pub use budget::{SlotPlan, VramBudget};
pub use cache::{ExpertCache, ExpertWeights, LayerRecall};
pub use policy::EvictionPolicy;
pub use select::{BigFallback, BigLittle, Importance, SelectionStats, Selector};
pub use stats::ExpertStats;
pub use store::ExpertStore;
pub use transfer::LinkModel;
