//! The cache simulator behind `ferry cache-sim`: replays a routing trace through the runtime's
//! own eviction code (`EvictionPolicy::victim`, `SlotUse::touch`, `most_used`) in the order
//! `ExpertCache::run_layer` fetches (per layer, the resident experts then the misses, by index;
//! the layer's fetched experts are protected until a batch must be launched), and computes
//! Belady's MIN for the same slots: the most hits any policy can get on that trace.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::policy::{ExpertId, Moment, SlotUse, most_used};
use super::trace::LayerTrace;
use crate::options::EvictionPolicy;

/// A cache to replay a trace through.
#[derive(Debug, Clone, Copy)]
pub struct SimCache {
    pub slots: usize,
    pub policy: EvictionPolicy,
    /// The fewest slots that work (one layer's top-k): `lfu-pinned` pins half of the rest.
    pub min_slots: usize,
    /// MoE layers, for `lfu-pinned`'s share of pins per layer.
    pub moe_layers: usize,
}

/// Demand accesses of a replay: one per (forward pass, layer, expert used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimCounts {
    pub accesses: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl SimCounts {
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.accesses.max(1) as f64
    }
}

/// The experts a layer fetches, in index order, once each.
fn needed(entry: &LayerTrace) -> Vec<usize> {
    let mut experts: Vec<usize> = entry.experts.iter().flatten().map(|&e| e as usize).collect();
    experts.sort_unstable();
    experts.dedup();
    experts
}

/// Replays `trace` through `cache`, starting empty.
pub fn simulate(trace: &[LayerTrace], cache: SimCache) -> SimCounts {
    let cycle = trace.iter().map(|t| t.layer + 1).max().unwrap_or(0);
    let experts = trace.iter().flat_map(|t| t.experts.iter().flatten()).map(|&e| e as usize + 1).max().unwrap_or(0);
    let mut usage = vec![vec![0u64; experts]; cycle];
    let layers: Vec<usize> = {
        let set: BTreeSet<usize> = trace.iter().map(|t| t.layer).collect();
        set.into_iter().collect()
    };
    let mut slots: HashMap<ExpertId, SlotUse> = HashMap::new();
    let mut pinned: HashSet<ExpertId> = HashSet::new();
    let mut counts = SimCounts::default();
    let mut clock = 0u64;
    let mut current_pass = trace.first().map(|t| t.pass);
    let capacity = cache.slots.max(1);
    for entry in trace {
        if current_pass != Some(entry.pass) {
            current_pass = Some(entry.pass);
            end_forward(&cache, &usage, &layers, &mut pinned, &mut slots);
        }
        let predicted: HashSet<ExpertId> = (entry.predicted.iter())
            .filter(|p| p.target > entry.layer)
            .flat_map(|p| p.experts.iter().flatten().map(|&e| (p.target, e as usize)))
            .collect();
        let needed = needed(entry);
        let (hits, misses): (Vec<usize>, Vec<usize>) =
            needed.iter().partition(|&&e| slots.contains_key(&(entry.layer, e)));
        let mut keep: HashSet<ExpertId> = HashSet::new();
        for e in hits.into_iter().chain(misses) {
            let id = (entry.layer, e);
            counts.accesses += 1;
            clock += 1;
            usage[entry.layer][e] += 1;
            if let Some(slot) = slots.get_mut(&id) {
                slot.touch(clock, entry.pass);
                counts.hits += 1;
            } else {
                while slots.len() >= capacity {
                    let now =
                        Moment { pass: entry.pass, layer: entry.layer, cycle, predicted: &predicted, usage: &usage };
                    match cache.policy.victim(slots.iter().map(|(id, s)| (*id, s)), &keep, &now) {
                        Some(victim) => {
                            slots.remove(&victim);
                            counts.evictions += 1;
                        }
                        // Only this layer's batch is left: its kernels are launched first.
                        None => keep.clear(),
                    }
                }
                let mut slot = SlotUse::arrived(clock, entry.pass, pinned.contains(&id));
                slot.touch(clock, entry.pass);
                slots.insert(id, slot);
                counts.misses += 1;
            }
            keep.insert(id);
        }
    }
    counts
}

/// `ExpertCache::end_forward`: under `lfu-pinned`, the first pass's most used experts are pinned.
fn end_forward(
    cache: &SimCache,
    usage: &[Vec<u64>],
    layers: &[usize],
    pinned: &mut HashSet<ExpertId>,
    slots: &mut HashMap<ExpertId, SlotUse>,
) {
    if cache.policy != EvictionPolicy::LfuPinned || !pinned.is_empty() {
        return;
    }
    let spare = cache.slots.saturating_sub(cache.min_slots);
    *pinned = most_used(usage, layers, spare / 2 / cache.moe_layers.max(1));
    for (id, slot) in slots.iter_mut() {
        slot.pinned = pinned.contains(id);
    }
}

/// A trace's demand accesses in fetch order, `(pass, expert)`, and for each the index of the
/// same expert's next access (None: never again).
fn demand_accesses(trace: &[LayerTrace]) -> (Vec<(u64, ExpertId)>, Vec<Option<usize>>) {
    let accesses: Vec<(u64, ExpertId)> =
        trace.iter().flat_map(|entry| needed(entry).into_iter().map(move |e| (entry.pass, (entry.layer, e)))).collect();
    let mut next_use = vec![None; accesses.len()];
    let mut seen: HashMap<ExpertId, usize> = HashMap::new();
    for (i, (_, id)) in accesses.iter().enumerate().rev() {
        next_use[i] = seen.insert(*id, i);
    }
    (accesses, next_use)
}

/// Belady's MIN over the same accesses: on a miss with every slot taken, evict the expert used
/// again furthest in the future (or never).
pub fn belady(trace: &[LayerTrace], slots: usize) -> SimCounts {
    let (accesses, next) = demand_accesses(trace);
    let accesses: Vec<ExpertId> = accesses.into_iter().map(|(_, id)| id).collect();
    let next_use: Vec<usize> = next.into_iter().map(|n| n.unwrap_or(usize::MAX)).collect();
    let capacity = slots.max(1);
    let mut resident: HashMap<ExpertId, usize> = HashMap::new();
    let mut by_next: BTreeSet<(usize, ExpertId)> = BTreeSet::new();
    let mut counts = SimCounts::default();
    for (i, id) in accesses.iter().enumerate() {
        counts.accesses += 1;
        if let Some(next) = resident.get_mut(id) {
            by_next.remove(&(*next, *id));
            *next = next_use[i];
            by_next.insert((next_use[i], *id));
            counts.hits += 1;
            continue;
        }
        counts.misses += 1;
        if resident.len() >= capacity
            && let Some(&(next, victim)) = by_next.iter().next_back()
        {
            by_next.remove(&(next, victim));
            resident.remove(&victim);
            counts.evictions += 1;
        }
        resident.insert(*id, next_use[i]);
        by_next.insert((next_use[i], *id));
    }
    counts
}

/// MIN with a horizon: the next uses an evicting cache knows are those within `horizon` forward
/// passes after the current one (0: the rest of this pass, what a perfect predictor of the coming
/// layers knows; a token's routing is not known before the token is). Among slots with no known
/// next use, the least recently used goes first, or the least used since the trace began (then
/// the least recently used), whichever hits more; if every slot has a known next use, the
/// furthest. It shows what prediction within that horizon can add to a demand cache, where
/// `belady` bounds everything.
pub fn horizon_min(trace: &[LayerTrace], slots: usize, horizon: u64) -> SimCounts {
    let (accesses, next_use) = demand_accesses(trace);
    let by_recency = horizon_replay(&accesses, &next_use, slots, horizon, false);
    let by_uses = horizon_replay(&accesses, &next_use, slots, horizon, true);
    if by_uses.hits > by_recency.hits { by_uses } else { by_recency }
}

fn horizon_replay(
    accesses: &[(u64, ExpertId)],
    next_use: &[Option<usize>],
    slots: usize,
    horizon: u64,
    by_uses: bool,
) -> SimCounts {
    let capacity = slots.max(1);
    // Per resident expert: its next access (index) and its last one; uses of every expert.
    let mut resident: HashMap<ExpertId, (Option<usize>, usize)> = HashMap::new();
    let mut uses: HashMap<ExpertId, usize> = HashMap::new();
    let mut counts = SimCounts::default();
    for (i, &(pass, id)) in accesses.iter().enumerate() {
        counts.accesses += 1;
        *uses.entry(id).or_default() += 1;
        if let Some(slot) = resident.get_mut(&id) {
            *slot = (next_use[i], i);
            counts.hits += 1;
            continue;
        }
        counts.misses += 1;
        if resident.len() >= capacity {
            let known = |next: Option<usize>| next.filter(|&n| accesses[n].0 <= pass + horizon);
            // Slots without a known next use go first (fewest uses first when `by_uses`, then
            // least recently used); then the furthest known next use.
            let victim = resident
                .iter()
                .max_by_key(|(id, (next, last))| match known(*next) {
                    None => (1, if by_uses { usize::MAX - uses[*id] } else { 0 }, usize::MAX - last, **id),
                    Some(n) => (0, 0, n, **id),
                })
                .map(|(id, _)| *id);
            if let Some(victim) = victim {
                resident.remove(&victim);
                counts.evictions += 1;
            }
        }
        resident.insert(id, (next_use[i], i));
    }
    counts
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    fn step(pass: u64, layer: usize, experts: &[u32]) -> LayerTrace {
        LayerTrace {
            pass,
            layer,
            experts: vec![experts.to_vec()],
            weights: vec![vec![0.5; experts.len()]],
            predicted: None,
            inputs: None,
            logits: None,
            block_inputs: None,
        }
    }

    #[test]
    fn belady_beats_lru_on_a_cyclic_sweep_and_nothing_beats_belady() {
        // Two layers, one expert each per pass, three experts cycling in layer 0: LRU with three
        // slots always evicts what comes next.
        let mut trace = Vec::new();
        for pass in 0..30u64 {
            trace.push(step(pass, 0, &[(pass % 3) as u32]));
            trace.push(step(pass, 1, &[0]));
        }
        let cache = |policy| SimCache { slots: 3, policy, min_slots: 1, moe_layers: 2 };
        let lru = simulate(&trace, cache(EvictionPolicy::Lru));
        let min = belady(&trace, 3);
        assert_eq!(lru.accesses, 60);
        assert_eq!(min.accesses, 60);
        assert_eq!(lru.hits, 1 + 1 + 27, "layer 1's expert hits; layer 0's misses after the first pass too");
        assert!(min.hits > lru.hits, "MIN {min:?} vs LRU {lru:?}");
        // Knowing only each pass's own accesses, layer 0's next expert is a pass away: no better
        // than LRU here; a one-pass horizon sees it, and a horizon past the trace is MIN.
        assert_eq!(horizon_min(&trace, 3, 0).hits, lru.hits);
        assert_eq!(horizon_min(&trace, 3, 1).hits, min.hits);
        assert_eq!(horizon_min(&trace, 3, 1000), min);
        for policy in EvictionPolicy::iter() {
            let got = simulate(&trace, cache(policy));
            assert!(got.hits <= min.hits, "{policy}: {got:?} beats MIN {min:?}");
            assert_eq!(got.hits + got.misses, got.accesses);
        }
    }

    #[test]
    fn a_layer_wider_than_the_cache_launches_its_batch_and_goes_on() {
        // A prefill pass needing four experts with two slots: every fetch misses, none is lost.
        let trace = [step(0, 0, &[0, 1, 2, 3]), step(1, 0, &[3])];
        let got = simulate(&trace, SimCache { slots: 2, policy: EvictionPolicy::Lru, min_slots: 2, moe_layers: 1 });
        assert_eq!(got, SimCounts { accesses: 5, hits: 1, misses: 4, evictions: 2 });
        assert_eq!(belady(&trace, 2).hits, 1);
    }
}
