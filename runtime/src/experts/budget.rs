//! `--vram-budget`: how many expert slots fit next to the resident weights and KV cache.

use super::quant::ExpertDtype;
use crate::error::{FerryError, Result};
use crate::graph::DenseDtype;
use crate::spec::ModelSpec;

/// A GPU memory budget as the user gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VramBudget {
    /// Everything resident: every expert has a slot.
    All,
    /// Total bytes for everything on the GPU (resident weights, KV cache, expert slots).
    Bytes(u64),
    /// A fraction (0..=1) of all routed experts' bytes, for expert slots alone.
    FractionOfExperts(f64),
}

impl std::str::FromStr for VramBudget {
    type Err = FerryError;

    /// Parses `all`, `25%`, `1.5GiB`, `300MiB`, `512KiB`, `2GB`, or plain bytes.
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |why: &str| FerryError::flag("--vram-budget", format!("{s:?}: {why} (e.g. 1.5GiB, 300MiB, 25%, all)"));
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        if let Some(p) = t.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(bad("a percentage must be in (0, 100]"));
            }
            return Ok(if pct == 100.0 { Self::All } else { Self::FractionOfExperts(pct / 100.0) });
        }
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let value: f64 = number.trim().parse().map_err(|_| bad("not a size"))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            _ => return Err(bad("unknown unit")),
        };
        if !(value > 0.0 && value.is_finite()) {
            return Err(bad("must be positive"));
        }
        Ok(Self::Bytes((value * scale) as u64))
    }
}

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
            Self::FractionOfExperts(f) => ((total_experts as f64 * f).floor() as usize).min(total_experts),
            Self::Bytes(b) => (b.saturating_sub(resident_bytes + kv_bytes) / slot_bytes.max(1)) as usize,
        }
        .min(total_experts);
        let minimum = spec.moe.top_k.min(total_experts);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_in_binary_and_decimal_units_and_percent() {
        assert_eq!("1.5GiB".parse::<VramBudget>().unwrap(), VramBudget::Bytes(1536 * 1024 * 1024));
        assert_eq!("300MiB".parse::<VramBudget>().unwrap(), VramBudget::Bytes(300 * 1024 * 1024));
        assert_eq!("2GB".parse::<VramBudget>().unwrap(), VramBudget::Bytes(2_000_000_000));
        assert_eq!("25%".parse::<VramBudget>().unwrap(), VramBudget::FractionOfExperts(0.25));
        assert_eq!("100%".parse::<VramBudget>().unwrap(), VramBudget::All);
        assert_eq!("all".parse::<VramBudget>().unwrap(), VramBudget::All);
        for bad in ["", "-1MiB", "12 parsecs", "0%", "150%", "abc"] {
            let err = bad.parse::<VramBudget>().unwrap_err().to_string();
            assert!(err.contains("--vram-budget"), "{bad}: {err}");
        }
    }
}
