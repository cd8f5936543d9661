//! GPU side of the expert manager: a fixed number of expert slots, a residency table, and the
//! upload of missing experts into free or evicted slots.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

use super::budget::SlotPlan;
use super::policy::{EvictionPolicy, SlotUse};
use super::stats::ExpertStats;
use super::store::ExpertStore;
use crate::error::Result;

/// One expert on the GPU, in checkpoint layout: gate and up `[intermediate, hidden]`, down
/// `[hidden, intermediate]`. Clones share the GPU memory.
#[derive(Clone)]
pub struct ExpertWeights {
    gate: Tensor<2>,
    up: Tensor<2>,
    down: Tensor<2>,
}

impl ExpertWeights {
    /// SwiGLU: `down(silu(gate(x)) * up(x))` for `x` `[tokens, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gated = silu(x.clone().matmul(self.gate.clone().transpose())) * x.matmul(self.up.clone().transpose());
        gated.matmul(self.down.clone().transpose())
    }
}

struct Slot {
    weights: ExpertWeights,
    use_: SlotUse,
}

type ExpertId = (usize, usize);

/// The slot cache. `fetch` hands out an expert's weights, uploading it first on a miss.
pub struct ExpertCache {
    store: ExpertStore,
    device: Device,
    policy: EvictionPolicy,
    plan: SlotPlan,
    slots: HashMap<ExpertId, Slot>,
    pinned: HashSet<ExpertId>,
    /// How often each expert was used, `[layer][expert]`, since the cache was made.
    usage: Vec<Vec<u64>>,
    clock: u64,
    stats: ExpertStats,
}

impl ExpertCache {
    pub fn new(store: ExpertStore, device: Device, plan: SlotPlan, policy: EvictionPolicy) -> Self {
        let layers = store.moe_layers().max().map_or(0, |l| l + 1);
        let usage = (0..layers).map(|l| vec![0; store.num_experts(l)]).collect();
        Self {
            store,
            device,
            policy,
            plan,
            slots: HashMap::new(),
            pinned: HashSet::new(),
            usage,
            clock: 0,
            stats: ExpertStats::default(),
        }
    }

    pub fn plan(&self) -> &SlotPlan {
        &self.plan
    }

    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    pub fn stats(&self) -> ExpertStats {
        self.stats
    }

    pub fn is_resident(&self, layer: usize, expert: usize) -> bool {
        self.slots.contains_key(&(layer, expert))
    }

    /// Resident experts per layer (dense layers: 0).
    pub fn resident_per_layer(&self) -> Vec<usize> {
        let mut counts = vec![0; self.usage.len()];
        for (layer, _) in self.slots.keys() {
            counts[*layer] += 1;
        }
        counts
    }

    /// Uses per expert, `[layer][expert]` (a profile that `lfu-pinned` can start from).
    pub fn usage(&self) -> &[Vec<u64>] {
        &self.usage
    }

    /// Changes budget and policy; experts beyond the new capacity are evicted now.
    pub fn reconfigure(&mut self, plan: SlotPlan, policy: EvictionPolicy) {
        self.plan = plan;
        self.policy = policy;
        self.pinned.clear();
        while self.slots.len() > self.plan.slots {
            self.evict_one();
        }
    }

    /// Empties every slot (a cold start for measurements); pins and usage counts stay.
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// With every expert resident, uploads them all now so that generation never misses.
    /// Offloaded caches start empty: what is resident is what tokens asked for.
    pub fn preload(&mut self) -> Result<()> {
        if !self.plan.all_resident() {
            return Ok(());
        }
        let all: Vec<ExpertId> =
            self.store.moe_layers().flat_map(|l| (0..self.store.num_experts(l)).map(move |e| (l, e))).collect();
        for (layer, expert) in all.into_iter().take(self.plan.slots) {
            if !self.is_resident(layer, expert) {
                let weights = self.upload(layer, expert)?;
                self.slots
                    .insert((layer, expert), Slot { weights, use_: SlotUse { last_use: 0, uses: 0, pinned: false } });
            }
        }
        // Preloading is set-up, not traffic of any token.
        self.stats = ExpertStats::default();
        Ok(())
    }

    /// The expert's weights, uploading it into a free or evicted slot on a miss.
    pub fn fetch(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights> {
        self.clock += 1;
        self.usage[layer][expert] += 1;
        let id = (layer, expert);
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.use_.last_use = self.clock;
            slot.use_.uses += 1;
            self.stats.hits += 1;
            return Ok(slot.weights.clone());
        }
        self.stats.misses += 1;
        while self.slots.len() >= self.plan.slots.max(1) {
            self.evict_one();
        }
        let weights = self.upload(layer, expert)?;
        let pinned = self.pinned.contains(&id);
        self.slots
            .insert(id, Slot { weights: weights.clone(), use_: SlotUse { last_use: self.clock, uses: 1, pinned } });
        Ok(weights)
    }

    /// Called after each forward pass. Under `lfu-pinned`, the first pass (the prompt) is the
    /// warm-up: its most used experts per layer become pinned, unless a profile pinned them.
    pub fn end_forward(&mut self) {
        if self.policy == EvictionPolicy::LfuPinned && self.pinned.is_empty() {
            let usage = self.usage.clone();
            self.pin_most_used(&usage);
        }
    }

    /// Pins, per layer, the experts with the highest counts: half the slots beyond one layer's
    /// needs, shared evenly between MoE layers.
    pub fn pin_most_used(&mut self, counts: &[Vec<u64>]) {
        let layers: Vec<usize> = self.store.moe_layers().collect();
        let spare = self.plan.slots.saturating_sub(self.plan.min_slots);
        let per_layer = spare / 2 / layers.len().max(1);
        self.pinned.clear();
        for &layer in &layers {
            let Some(row) = counts.get(layer) else { continue };
            let mut order: Vec<usize> = (0..row.len()).filter(|&e| row[e] > 0).collect();
            order.sort_by(|&a, &b| row[b].cmp(&row[a]).then(a.cmp(&b)));
            for &e in order.iter().take(per_layer) {
                self.pinned.insert((layer, e));
            }
        }
        for (id, slot) in self.slots.iter_mut() {
            slot.use_.pinned = self.pinned.contains(id);
        }
    }

    /// Pinned experts, sorted.
    pub fn pinned(&self) -> Vec<ExpertId> {
        let mut pinned: Vec<ExpertId> = self.pinned.iter().copied().collect();
        pinned.sort_unstable();
        pinned
    }

    fn evict_one(&mut self) {
        let policy = self.policy;
        let victim = self
            .slots
            .iter()
            .filter(|(_, s)| !s.use_.pinned)
            .min_by_key(|(id, s)| (policy.victim_key(&s.use_), **id))
            .or_else(|| self.slots.iter().min_by_key(|(id, s)| (policy.victim_key(&s.use_), **id)))
            .map(|(id, _)| *id);
        if let Some(id) = victim {
            // Kernels already queued keep their own reference to the buffers.
            self.slots.remove(&id);
            self.stats.evictions += 1;
        }
    }

    fn upload(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights> {
        let start = Instant::now();
        let (i, h) = self.store.dims();
        let [gate, up, down] = self.store.host_f32(layer, expert);
        let device = &self.device;
        let weights = ExpertWeights {
            gate: Tensor::from_data(TensorData::new(gate, [i, h]), device),
            up: Tensor::from_data(TensorData::new(up, [i, h]), device),
            down: Tensor::from_data(TensorData::new(down, [h, i]), device),
        };
        self.stats.bytes_uploaded += self.plan.slot_bytes;
        self.stats.stall_seconds += start.elapsed().as_secs_f64();
        Ok(weights)
    }
}
