//! GPU side of the expert manager: a fixed number of expert slots, a residency table, and the
//! upload of missing experts into free or evicted slots.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use ferry_shaders::stream::ReadProbe;

use super::budget::SlotPlan;
use super::hybrid::Hybrid;
use super::policy::{Moment, SlotUse, most_used};
use super::prefetch::LayerRecall;
use super::residency::{Access, AccessLog, ExpertCell, Residency, SlotState};
use super::select::{SelectionStats, Selector};
use super::slots::{SlotPage, SlotPool, SlotRef, Upload};
use super::stats::ExpertStats;
use super::store::{ExpertStore, HostExpert};
use super::transfer::{StagedExpert, UploadQueue};
use crate::error::{FerryError, Result};
use crate::options::{BigLittle, EvictionPolicy, ExpertDtype, Importance, LinkModel, MissPolicy};
use crate::routing::TokenRoute;

pub(super) struct Slot {
    /// Index in the slot pool.
    pub(super) index: usize,
    pub(super) use_: SlotUse,
    /// Brought in by a prediction and not used yet.
    pub(super) unused_prefetch: bool,
}

pub(super) use super::policy::ExpertId;

/// The slot cache. `fetch` hands out an expert's slot, uploading it first on a miss;
/// `prefetch` starts bringing in experts a later layer is expected to need.
pub struct ExpertCache {
    pub(super) store: Arc<ExpertStore>,
    pub(super) pool: SlotPool,
    pub(super) policy: EvictionPolicy,
    pub(super) plan: SlotPlan,
    pub(super) slots: HashMap<ExpertId, Slot>,
    pub(super) pinned: HashSet<ExpertId>,
    /// How often each expert was used, `[layer][expert]`, since the cache was made.
    pub(super) usage: Vec<Vec<u64>>,
    /// `usage` when the configuration last changed: `lfu-pinned`'s warm-up pins from the uses
    /// since then, not from passes made under another policy or budget.
    pub(super) usage_at_reconfigure: Vec<Vec<u64>>,
    pub(super) clock: u64,
    pub(super) stats: ExpertStats,
    pub(super) link: Option<LinkModel>,
    pub(super) queue: Option<UploadQueue>,
    /// Per (layer, page), the page's slots of the layer's experts as last uploaded for routing on
    /// the device (`run_layer_on_device`).
    pub(super) device_slots: HashMap<(usize, usize), (Vec<u32>, burn_cubecl::tensor::CubeTensor)>,
    /// Prefetched experts whose host staging is under way; each holds a reserved slot.
    pub(super) in_flight: HashSet<ExpertId>,
    /// Staged experts that arrived while waiting for another one.
    pub(super) staged: HashMap<ExpertId, StagedExpert>,
    /// In-flight experts whose layer has passed without using them.
    pub(super) orphans: HashSet<ExpertId>,
    /// Per layer: the experts predicted for each token of the current pass.
    pub(super) predictions: HashMap<usize, Vec<Vec<u32>>>,
    pub(super) recall: Vec<LayerRecall>,
    /// Big-little selection, when on.
    pub(super) selector: Option<Selector>,
    /// Counts of selectors since replaced or turned off, so that statistics stay cumulative.
    pub(super) retired: SelectionStats,
    /// Per-expert hits and misses and the events since the last `residency` picture.
    pub(super) log: AccessLog,
    /// Upload or compute on the host (`--miss-policy`), and the rates `auto` weighs.
    pub(super) hybrid: Hybrid,
    /// `[layer][expert]`: seconds the host spent computing the expert beyond what reading it from
    /// a slot would have cost, since it last held one (what `auto` weighs against filling a free
    /// slot).
    pub(super) host_excess: Vec<Vec<f64>>,
    /// Forward passes since the configuration last changed (for expected reuse).
    pub(super) passes: u64,
    /// Forward passes since the cache was made, and the MoE layer computing now: where the
    /// sweep is, for the policies that look at it.
    pub(super) pass: u64,
    pub(super) layer: usize,
    /// What `run_layer` records for `ferry trace`, when on.
    pub(super) trace: Option<super::trace::TraceLog>,
}

impl ExpertCache {
    /// `page_bytes` caps the GPU buffers that hold the slots (None: the adapter's binding limit).
    pub fn new(
        store: ExpertStore,
        device: &Device,
        plan: SlotPlan,
        policy: EvictionPolicy,
        page_bytes: Option<u64>,
    ) -> Result<Self> {
        let layers = store.moe_layers().max().map_or(0, |l| l + 1);
        let usage: Vec<Vec<u64>> = (0..layers).map(|l| vec![0; store.num_experts(l)]).collect();
        let (inter, hidden) = store.dims();
        let pool = SlotPool::new(device, plan.slots, hidden, inter, store.dtype(), page_bytes)?;
        Ok(Self {
            store: Arc::new(store),
            pool,
            policy,
            plan,
            slots: HashMap::new(),
            pinned: HashSet::new(),
            usage_at_reconfigure: usage.clone(),
            clock: 0,
            stats: ExpertStats::default(),
            link: None,
            queue: None,
            device_slots: HashMap::new(),
            in_flight: HashSet::new(),
            staged: HashMap::new(),
            orphans: HashSet::new(),
            predictions: HashMap::new(),
            recall: vec![LayerRecall::default(); layers],
            selector: None,
            retired: SelectionStats::default(),
            log: AccessLog::default(),
            hybrid: Hybrid::default(),
            host_excess: usage.iter().map(|r| vec![0.0; r.len()]).collect(),
            usage,
            passes: 0,
            pass: 0,
            layer: 0,
            trace: None,
        })
    }

    /// Turns big-little selection on (with its settings) or off.
    pub fn set_big_little(&mut self, config: Option<BigLittle>) {
        let layers = self.usage.len();
        if let (Some(c), Some(s)) = (config, self.selector.as_mut())
            && s.config.importance == c.importance
        {
            s.config = c;
            return;
        }
        // Scores of another importance are on another scale: its history would set the
        // threshold, so a new score starts a new selector; the old one's counts are kept.
        if let Some(old) = self.selector.take() {
            self.retired.absorb(&old.stats);
        }
        self.selector = config.map(|c| Selector::new(c, layers));
    }

    /// Whether big-little needs the attention each token receives (`--importance attention`);
    /// the model computes it only then.
    pub fn wants_received_attention(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| s.config.importance == Importance::Attention)
    }

    /// Applies big-little selection to a layer's routes (no-op when off); see
    /// `Selector::apply`.
    pub(super) fn select_big_little(
        &mut self,
        layer: usize,
        routes: &mut [TokenRoute],
        logits: &[f32],
        num_experts: usize,
        received: Option<&[f32]>,
    ) -> Result<()> {
        let (slots, in_flight) = (&self.slots, &self.in_flight);
        let Some(selector) = self.selector.as_mut() else { return Ok(()) };
        let resident = |e: usize| slots.contains_key(&(layer, e)) || in_flight.contains(&(layer, e));
        selector.apply(layer, routes, logits, num_experts, received, resident)
    }

    /// Whether each token is expected to be big in a later `layer` (see `Selector::expect_big`);
    /// None when big-little is off.
    pub(super) fn expect_big(
        &mut self,
        layer: usize,
        logits: &[f32],
        num_experts: usize,
        routes: &[TokenRoute],
        received: Option<&[f32]>,
    ) -> Option<Vec<bool>> {
        Some(self.selector.as_mut()?.expect_big(layer, logits, num_experts, routes, received))
    }

    pub fn plan(&self) -> &SlotPlan {
        &self.plan
    }

    /// How experts are stored in host RAM and GPU slots.
    pub fn dtype(&self) -> ExpertDtype {
        self.store.dtype()
    }

    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    pub fn stats(&self) -> ExpertStats {
        let mut stats = self.stats;
        let mut selection = self.retired;
        if let Some(s) = &self.selector {
            selection.absorb(&s.stats);
        }
        stats.big = selection.big;
        stats.little = selection.little;
        stats.fallbacks = selection.fallbacks;
        stats.substitutions = selection.substitutions;
        stats.modes_predicted = selection.modes_predicted;
        stats.modes_predicted_right = selection.modes_predicted_right;
        stats.big_predicted_little = selection.big_predicted_little;
        stats
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

    /// Where every expert is now and what happened to each since the previous call.
    pub fn residency(&mut self) -> Residency {
        self.settle_orphans();
        let recent = self.log.take_recent();
        let layers = (0..self.usage.len())
            .map(|layer| {
                (0..self.usage[layer].len())
                    .map(|expert| {
                        let id = (layer, expert);
                        let state = match self.slots.get(&id) {
                            Some(slot) if slot.use_.pinned => SlotState::Pinned,
                            Some(_) => SlotState::Resident,
                            None if self.in_flight.contains(&id) => SlotState::Uploading,
                            None => SlotState::Host,
                        };
                        let (hits, misses, last_use) = self.log.counts(id);
                        let uses = self.usage[layer][expert];
                        ExpertCell { state, access: recent.get(&id).copied(), uses, hits, misses, last_use }
                    })
                    .collect()
            })
            .collect();
        let big = self.selector.as_ref().map(|s| s.last_big().to_vec()).unwrap_or_default();
        Residency { layers, expert_bytes: self.plan.slot_bytes, slots: self.plan.slots, clock: self.clock, big }
    }

    /// Uses per expert, `[layer][expert]` (a profile that `lfu-pinned` can start from).
    pub fn usage(&self) -> &[Vec<u64>] {
        &self.usage
    }

    /// Sets `--miss-policy` and the host kernel's threads (None: every core).
    /// `auto` measures the device's read rate the first time (a few tens of milliseconds).
    pub fn set_miss_policy(&mut self, policy: MissPolicy, threads: Option<usize>, device: &Device) -> Result<()> {
        self.hybrid
            .configure(policy, threads)
            .map_err(|e| FerryError::flag("--cpu-threads", format!("the host expert threads did not start: {e}")))?;
        if self.hybrid.wants_device_rate() {
            let bytes = (self.plan.slot_bytes as usize).clamp(1 << 20, 32 << 20);
            // The read probe's rate: what computing a resident expert costs per weight byte when
            // a step is memory-bound.
            let rates = ReadProbe::seconds_per_byte(device, bytes, 8, 3)?;
            self.hybrid.set_device_rate(rates.best());
        }
        Ok(())
    }

    /// Whether a MoE layer must hand its tokens to the host too: some misses may be computed
    /// there.
    pub fn wants_host_tokens(&self) -> bool {
        self.hybrid.policy != MissPolicy::Upload && !self.plan.all_resident() || self.traces_inputs()
    }

    /// Changes budget and policy; experts beyond the new capacity are evicted now.
    pub fn reconfigure(&mut self, plan: SlotPlan, policy: EvictionPolicy) {
        self.passes = 0;
        self.drain_in_flight();
        self.plan = plan;
        self.policy = policy;
        self.pinned.clear();
        self.usage_at_reconfigure = self.usage.clone();
        self.host_excess.iter_mut().flatten().for_each(|s| *s = 0.0);
        while self.slots.len() > self.plan.slots {
            self.evict_one(&HashSet::new());
        }
        // Experts whose slot memory goes away are dropped; the rest keep their slots.
        let gone = self.pool.resize(self.plan.slots);
        self.slots.retain(|_, s| !gone.contains(&s.index));
        for slot in self.slots.values() {
            self.pool.keep(slot.index);
        }
    }

    /// Empties every slot (a cold start for measurements); pins and usage counts stay.
    pub fn clear(&mut self) {
        self.drain_in_flight();
        self.slots.clear();
        self.pool.clear();
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
                let store = Arc::clone(&self.store);
                self.occupy((layer, expert), source(&store, layer, expert), 0, false)?;
            }
        }
        // Preloading is set-up, not traffic of any token.
        self.stats = ExpertStats::default();
        Ok(())
    }

    /// The expert's slot, uploading it into a free or evicted slot on a miss.
    pub fn fetch(&mut self, layer: usize, expert: usize) -> Result<SlotRef> {
        self.fetch_keeping(layer, expert, &HashSet::new())?
            .ok_or_else(|| FerryError::Gpu(format!("no expert slot could be freed for layer {layer} expert {expert}")))
    }

    /// Like `fetch`, but never evicts an expert in `keep` (those a queued batch still reads
    /// before its kernels are launched). None when only such experts could make room; nothing
    /// is counted then.
    pub(super) fn fetch_keeping(
        &mut self,
        layer: usize,
        expert: usize,
        keep: &HashSet<ExpertId>,
    ) -> Result<Option<SlotRef>> {
        self.settle_orphans();
        let id = (layer, expert);
        if let Some(slot) = self.slots.get_mut(&id) {
            self.clock += 1;
            self.usage[layer][expert] += 1;
            slot.use_.touch(self.clock, self.pass);
            slot.unused_prefetch = false;
            self.stats.hits += 1;
            self.log.record(id, Access::Hit, self.clock);
            return Ok(Some(self.pool.locate(slot.index)));
        }
        let at = if self.in_flight.contains(&id) {
            // Predicted in time to stage on the host; what is left is waiting for the stager
            // and the GPU copy. Its slot was reserved when it was requested.
            let start = Instant::now();
            let store = Arc::clone(&self.store);
            let upload = match self.wait_staged(id) {
                Some(staged) => staged.weights,
                None => self.upload_host(&store, layer, expert),
            };
            self.clock += 1;
            let at = self.occupy(id, upload, self.clock, false)?;
            self.stats.stall_seconds += start.elapsed().as_secs_f64();
            self.stats.prefetch_hits += 1;
            self.stats.hits += 1;
            self.log.record(id, Access::PrefetchHit, self.clock);
            at
        } else {
            while self.occupied() >= self.plan.slots.max(1) {
                if self.evict_one(keep) {
                    continue;
                }
                if self.in_flight.is_empty() {
                    return Ok(None);
                }
                // Prefetches for a later layer hold the free slots: let them land, so that they
                // can be evicted like any other slot.
                self.drain_in_flight();
            }
            self.stats.misses += 1;
            let start = Instant::now();
            let store = Arc::clone(&self.store);
            let upload = self.upload_host(&store, layer, expert);
            self.clock += 1;
            let at = self.occupy(id, upload, self.clock, false)?;
            let seconds = start.elapsed().as_secs_f64();
            self.stats.stall_seconds += seconds;
            self.hybrid.record_upload(self.plan.slot_bytes, seconds);
            self.log.record(id, Access::Miss, self.clock);
            at
        };
        self.usage[layer][expert] += 1;
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.use_.touch(self.clock, self.pass);
        }
        Ok(Some(at))
    }

    /// `(intermediate, hidden)` of every routed expert.
    pub fn dims(&self) -> (usize, usize) {
        self.store.dims()
    }

    /// The page of GPU memory a `SlotRef` points into.
    pub(super) fn page(&self, page: usize) -> Result<&SlotPage> {
        self.pool.page(page)
    }

    pub(super) fn occupied(&self) -> usize {
        self.slots.len() + self.in_flight.len()
    }

    /// Called after each forward pass. Under `lfu-pinned`, the first pass (the prompt) after
    /// loading or reconfiguring is the warm-up: its most used experts per layer become pinned,
    /// unless a profile pinned them.
    pub fn end_forward(&mut self) {
        self.passes += 1;
        self.pass += 1;
        if self.policy == EvictionPolicy::LfuPinned && self.pinned.is_empty() {
            let since: Vec<Vec<u64>> = (self.usage.iter().zip(&self.usage_at_reconfigure))
                .map(|(now, then)| now.iter().zip(then).map(|(n, t)| n - t).collect())
                .collect();
            self.pin_most_used(&since);
        }
    }

    /// Pins, per layer, the experts with the highest counts: half the slots beyond one layer's
    /// needs, shared evenly between MoE layers.
    pub fn pin_most_used(&mut self, counts: &[Vec<u64>]) {
        let layers: Vec<usize> = self.store.moe_layers().collect();
        let spare = self.plan.slots.saturating_sub(self.plan.min_slots);
        let per_layer = spare / 2 / layers.len().max(1);
        self.pinned = most_used(counts, &layers, per_layer);
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

    /// The expert the eviction policy would evict now, sparing `keep`.
    pub(super) fn victim(&self, keep: &HashSet<ExpertId>) -> Option<ExpertId> {
        // Only lookahead reads the predictions; the other policies skip gathering them per miss.
        let predicted: HashSet<ExpertId> =
            if matches!(self.policy, EvictionPolicy::Lookahead | EvictionPolicy::LookaheadLfu) {
                (self.predictions.iter())
                    .filter(|(target, _)| **target > self.layer)
                    .flat_map(|(&target, per_token)| per_token.iter().flatten().map(move |&e| (target, e as usize)))
                    .collect()
            } else {
                HashSet::new()
            };
        let now = Moment {
            pass: self.pass,
            layer: self.layer,
            cycle: self.usage.len(),
            predicted: &predicted,
            usage: &self.usage,
        };
        let slots = self.slots.iter().map(|(id, s)| (*id, &s.use_));
        self.policy.victim(slots, keep, &now)
    }

    /// Evicts one slot by policy, never one in `keep`; pinned slots only when nothing else is
    /// left. Returns false when nothing could be evicted.
    pub(super) fn evict_one(&mut self, keep: &HashSet<ExpertId>) -> bool {
        let Some(id) = self.victim(keep) else { return false };
        // Kernels already queued that read this slot run before whatever is copied into it next.
        if let Some(slot) = self.slots.remove(&id) {
            self.pool.release(slot.index);
            if slot.unused_prefetch {
                self.stats.wasted_prefetch_bytes += self.plan.slot_bytes;
            }
        }
        self.stats.evictions += 1;
        self.log.record(id, Access::Evicted, self.clock);
        true
    }

    /// An on-demand upload's host part: the mapped bytes or their conversion, and the emulated
    /// link if any.
    pub(super) fn upload_host<'s>(&mut self, store: &'s ExpertStore, layer: usize, expert: usize) -> Upload<'s> {
        let start = Instant::now();
        let upload = source(store, layer, expert);
        if let Some(link) = self.link {
            link.wait_out(self.plan.slot_bytes, start.elapsed());
        }
        self.stats.bytes_uploaded += self.plan.slot_bytes;
        upload
    }

    /// Copies a staged expert into a free slot and makes it resident. Host and mapped weights
    /// are checked here; the upload thread checked what it wrote into a staging buffer.
    pub(super) fn occupy(
        &mut self,
        id: ExpertId,
        upload: Upload<'_>,
        last_use: u64,
        prefetched: bool,
    ) -> Result<SlotRef> {
        finite_upload(id, &upload, self.store.dtype())?;
        let index = self.pool.take().ok_or_else(|| FerryError::Gpu("no free expert slot".into()))?;
        let ring = matches!(upload, Upload::Ring(_));
        let stored = match self.pool.store(index, upload) {
            Ok(Some(at)) if ring => {
                self.stats.staged_by_thread += 1;
                Ok(Some(at))
            }
            Ok(None) => {
                // A staging buffer from a ring since replaced: upload the expert again.
                let host = self.store.host(id.0, id.1);
                finite_expert(id, &host).and_then(|()| self.pool.store(index, Upload::Host(host)))
            }
            other => other,
        };
        let at = match stored {
            Ok(Some(at)) => at,
            Ok(None) => {
                self.pool.release(index);
                return Err(FerryError::Gpu(format!("layer {}, expert {}: upload was not stored", id.0, id.1)));
            }
            Err(e) => {
                self.pool.release(index);
                return Err(e);
            }
        };
        let use_ = SlotUse::arrived(last_use, self.pass, self.pinned.contains(&id));
        self.slots.insert(id, Slot { index, use_, unused_prefetch: prefetched });
        Ok(at)
    }
}

/// The expert as an upload takes it: its mapped bytes where they are what the slot holds, else
/// its converted form.
pub(super) fn source(store: &ExpertStore, layer: usize, expert: usize) -> Upload<'_> {
    match store.upload_bytes(layer, expert) {
        Some(parts) => Upload::Mapped(parts),
        None => Upload::Host(store.host(layer, expert)),
    }
}

/// An upload's check before it goes into a slot or a staging buffer: host and mapped weights
/// (`finite_expert`, `finite_mapped`); a filled staging buffer was checked when it was filled.
pub(super) fn finite_upload(id: ExpertId, upload: &Upload<'_>, dtype: ExpertDtype) -> Result<()> {
    match upload {
        Upload::Host(host) => finite_expert(id, host),
        Upload::Mapped(parts) => finite_mapped(id, *parts, dtype == ExpertDtype::Bf16),
        Upload::Ring(_) => Ok(()),
    }
}

/// A mapped expert's check (f32 or bf16 bytes, as `upload_bytes` gives them), as `finite_expert`.
fn finite_mapped(id: ExpertId, parts: [&[u8]; 3], bf16: bool) -> Result<()> {
    let first_bad = parts.map(|bytes| {
        if bf16 {
            first_non_finite(
                bytes.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
            )
        } else {
            first_non_finite(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
    });
    report_non_finite(id, first_bad)
}

/// Routed experts are converted on the host when first uploaded, not at load, so their values
/// are checked here: a NaN or Inf weight (or quantised scale) is an error naming the expert,
/// rather than NaN rows. Costs one pass over what the conversion just produced.
pub(super) fn finite_expert(id: ExpertId, host: &HostExpert) -> Result<()> {
    let first_bad: [Option<(usize, f32)>; 3] = if let HostExpert::F32(w) = host {
        w.each_ref().map(|v| first_non_finite(v.iter().copied()))
    } else if let HostExpert::Bf16(w) = host {
        // Two bf16 values per word, the low half first.
        w.each_ref().map(|words| {
            first_non_finite(words.iter().flat_map(|w| [f32::from_bits(w << 16), f32::from_bits(w & 0xFFFF_0000)]))
        })
    } else if let HostExpert::Quant(q) = host {
        [&q.gate, &q.up, &q.down].map(|m| first_non_finite(m.scales.iter().copied()))
    } else {
        return Ok(());
    };
    report_non_finite(id, first_bad)
}

/// The error for the first non-finite value of gate, up or down, if any.
fn report_non_finite((layer, expert): ExpertId, first_bad: [Option<(usize, f32)>; 3]) -> Result<()> {
    const PARTS: [&str; 3] = ["gate", "up", "down"];
    for (part, bad) in PARTS.iter().zip(first_bad) {
        if let Some((at, value)) = bad {
            return Err(FerryError::NonFinite(format!(
                "layer {layer}, routed expert {expert}: its {part} projection holds {value} at element {at} (scales \
                 for a quantised format); weights must be finite"
            )));
        }
    }
    Ok(())
}

fn first_non_finite(values: impl Iterator<Item = f32>) -> Option<(usize, f32)> {
    values.enumerate().find(|(_, v)| !v.is_finite())
}
