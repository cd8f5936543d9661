//! `--vram-budget`: how many expert slots fit next to the resident weights and KV cache.

use crate::error::{FerryError, Result};
use crate::options::{DenseDtype, ExpertDtype, VramBudget};
use crate::spec::ModelSpec;

/// How GPU memory is split under a budget, in bytes and slots.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotPlan {
    /// Expert slots (one slot holds one expert's three matrices).
    pub slots: usize,
    /// Bytes of one slot.
    pub slot_bytes: u64,
    /// Attention, norms, embeddings, routers, shared experts and dense layers.
    pub resident_bytes: u64,
    /// The KV cache counted against the budget.
    pub kv_bytes: u64,
    /// All routed experts of the model.
    pub total_experts: usize,
    /// The fewest slots that work: one layer's top-k.
    pub min_slots: usize,
}

impl SlotPlan {
    /// Bytes the plan puts on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        self.resident_bytes + self.kv_bytes + self.slots as u64 * self.slot_bytes
    }

    pub fn all_resident(&self) -> bool {
        self.slots >= self.total_experts
    }
}

/// Slots for a share of the experts (`--vram-budget 25%`), before the minimum is checked.
pub fn fraction_slots(total_experts: usize, fraction: f64) -> usize {
    ((total_experts as f64 * fraction).floor() as usize).min(total_experts)
}

/// Bytes per element on the GPU of everything but projections and experts (norms, biases, the
/// KV cache): the graph computes in f32.
const GPU_ELEMENT_BYTES: u64 = 4;

impl VramBudget {
    /// Splits the budget for f32 experts and projections. `kv_tokens` is the context the KV
    /// cache is counted for.
    pub fn plan(self, spec: &ModelSpec, kv_tokens: usize) -> Result<SlotPlan> {
        self.plan_for(spec, kv_tokens, ExpertDtype::F32, DenseDtype::F32)
    }

    /// Splits the budget for experts stored as `dtype` (a share of expert bytes is a share of
    /// the experts in that format) next to projections stored as `dense`.
    pub fn plan_for(
        self,
        spec: &ModelSpec,
        kv_tokens: usize,
        dtype: ExpertDtype,
        dense: DenseDtype,
    ) -> Result<SlotPlan> {
        let moe_layers = spec.layers.iter().filter(|l| matches!(l, crate::spec::FfnKind::Moe)).count();
        let total_experts = moe_layers * spec.moe.num_experts;
        let slot_bytes = dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
        let projections = spec.projection_params() as u64;
        let resident_bytes =
            projections * dense.bytes() + (spec.gpu_resident_params() as u64 - projections) * GPU_ELEMENT_BYTES;
        let kv_bytes = spec.attention.kv_elements(spec.num_layers(), kv_tokens) as u64 * GPU_ELEMENT_BYTES;
        let slots = match self {
            Self::All => total_experts,
            Self::FractionOfExperts(f) => fraction_slots(total_experts, f),
            Self::Bytes(b) => (b.saturating_sub(resident_bytes + kv_bytes) / slot_bytes.max(1)) as usize,
        }
        .min(total_experts);
        // `0%` asks for no slots at all: every routed expert computed on the host.
        let minimum = if self == Self::FractionOfExperts(0.0) { 0 } else { spec.moe.top_k.min(total_experts) };
        if slots < minimum {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let needed = resident_bytes + kv_bytes + minimum as u64 * slot_bytes;
            return Err(FerryError::flag(
                "--vram-budget",
                format!(
                    "too small: one layer's top-{} experts need {minimum} slots of {:.2} MiB next to {:.2} MiB of resident weights and {:.2} MiB of KV cache ({kv_tokens} tokens); the minimum is {:.2} MiB ({:.1}% of expert bytes)",
                    spec.moe.top_k,
                    mib(slot_bytes),
                    mib(resident_bytes),
                    mib(kv_bytes),
                    mib(needed),
                    100.0 * minimum as f64 / total_experts.max(1) as f64,
                ),
            ));
        }
        Ok(SlotPlan { slots, slot_bytes, resident_bytes, kv_bytes, total_experts, min_slots: minimum })
    }
}
