//! The expert manager: routed experts live in host memory (the memory-mapped checkpoint) and a
//! cache of expert slots on the GPU holds as many as the VRAM budget allows. A miss uploads the
//! expert into a free or evicted slot before its layer computes.

mod budget;
mod cache;
mod host;
mod hybrid;
mod manager;
mod policy;
mod prefetch;
mod quant;
mod residency;
mod select;
mod sim;
mod slots;
mod staging;
mod stats;
mod store;
mod trace;
mod transfer;

pub use budget::{SlotPlan, fraction_slots};
pub use cache::ExpertCache;
pub use ferry_shaders::format::{GROUP as QUANT_GROUP, code_rows};
pub use host::{HostExpertView, HostExtras, HostMatrix, LayerExtras};
pub use hybrid::{Decision, Hybrid, TOKENS_PER_PASS};
pub use manager::{LayerOutput, LayerRequest, Prediction};
pub use policy::{ExpertId, Moment, SlotUse, most_used};
pub use prefetch::LayerRecall;
pub use quant::QuantExpert;
pub use residency::{Access, ExpertCell, Residency, SlotState};
pub use select::{SelectionStats, Selector};
pub use sim::{SimCache, SimCounts, belady, horizon_min, simulate};
pub use slots::{SlotPage, SlotRef};
pub use stats::ExpertStats;
pub use store::{ExpertStore, HostExpert, HostSource, prequantised_names, stored_expert_dtype};
pub use trace::{LayerTrace, PredictedTrace, TraceOptions};
