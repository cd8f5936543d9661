//! Which resident expert gives up its slot when a miss needs one. The runtime's cache and the
//! cache simulator (`ferry cache-sim`) both choose through `EvictionPolicy::victim` and update
//! uses through `SlotUse::touch`, so a simulated policy is the policy the runtime runs.

use std::collections::HashSet;

use crate::options::EvictionPolicy;

/// `(layer, expert)`.
pub type ExpertId = (usize, usize);

/// What a policy knows about a resident expert.
#[derive(Debug, Clone, Copy)]
pub struct SlotUse {
    pub last_use: u64,
    pub uses: u64,
    pub pinned: bool,
    /// The forward pass of the last use (or of the arrival).
    pub last_pass: u64,
    /// Uses decayed by half per forward pass, as of `last_pass` (`lfru`).
    pub recent: f64,
}

impl SlotUse {
    /// An expert that has just arrived, unused (a prefetch) until `touch`.
    pub fn arrived(clock: u64, pass: u64, pinned: bool) -> Self {
        Self { last_use: clock, uses: 0, pinned, last_pass: pass, recent: 0.0 }
    }

    /// A use at `clock` during forward pass `pass`.
    pub fn touch(&mut self, clock: u64, pass: u64) {
        self.recent = self.decayed(pass) + 1.0;
        self.last_use = clock;
        self.uses += 1;
        self.last_pass = pass;
    }

    fn decayed(&self, pass: u64) -> f64 {
        let passes = pass.saturating_sub(self.last_pass).min(1100) as i32;
        self.recent * 0.5f64.powi(passes)
    }
}

/// Where the forward pass is when a slot must be freed.
#[derive(Debug, Clone, Copy)]
pub struct Moment<'a> {
    pub pass: u64,
    /// The layer being computed.
    pub layer: usize,
    /// Layers per forward pass (the sweep's length).
    pub cycle: usize,
    /// Experts predicted for layers after `layer` in this pass.
    pub predicted: &'a HashSet<ExpertId>,
    /// Uses per `[layer][expert]` since the cache was made, resident or not (`lookahead-lfu`).
    pub usage: &'a [Vec<u64>],
}

impl Moment<'_> {
    fn uses(&self, (layer, expert): ExpertId) -> u64 {
        self.usage.get(layer).and_then(|r| r.get(expert)).copied().unwrap_or(0)
    }
}

impl EvictionPolicy {
    /// The slot to free: never one in `keep`, a pinned one only when nothing else is left;
    /// None when every slot is kept. Ties go to the smallest `(layer, expert)`.
    pub fn victim<'a>(
        self,
        slots: impl Iterator<Item = (ExpertId, &'a SlotUse)> + Clone,
        keep: &HashSet<ExpertId>,
        now: &Moment,
    ) -> Option<ExpertId> {
        let key = |(id, s): &(ExpertId, &SlotUse)| (self.key(*id, s, now), *id);
        slots
            .clone()
            .filter(|(id, s)| !s.pinned && !keep.contains(id))
            .min_by_key(key)
            .or_else(|| slots.filter(|(id, _)| !keep.contains(id)).min_by_key(key))
            .map(|(id, _)| id)
    }

    /// Smaller keys are evicted first.
    fn key(self, id: ExpertId, slot: &SlotUse, now: &Moment) -> (u64, u64, u64) {
        let (pass, round) = staleness(id.0, slot, now);
        match self {
            Self::Lru | Self::LfuPinned => (slot.last_use, 0, 0),
            Self::Lfu => (slot.uses, slot.last_use, 0),
            Self::LeastStale => (pass, round, slot.last_use),
            // A decayed count is at most 2 (one use per pass); a fixed point keeps the order.
            Self::Lfru => ((slot.decayed(now.pass) * 1e9) as u64, pass, round),
            Self::Lookahead => (u64::from(now.predicted.contains(&id)), pass, round),
            Self::LookaheadLfu => (u64::from(now.predicted.contains(&id)), now.uses(id), slot.last_use),
        }
    }
}

/// `(pass of the last use, how soon the layer comes round)`: the second is smaller for a layer
/// further ahead in the sweep (the current layer's unused experts come round last).
fn staleness(layer: usize, slot: &SlotUse, now: &Moment) -> (u64, u64) {
    let cycle = now.cycle.max(1);
    // 0: the next layer; cycle - 1: the current one.
    let ahead = (layer % cycle + cycle - now.layer % cycle - 1) % cycle;
    (slot.last_pass, (cycle - 1 - ahead) as u64)
}

/// `lfu-pinned`'s pins: per layer, the `per_layer` experts with the highest counts (ties: the
/// smaller index), never one that was not used.
pub fn most_used(counts: &[Vec<u64>], layers: &[usize], per_layer: usize) -> HashSet<ExpertId> {
    let mut pinned = HashSet::new();
    for &layer in layers {
        let Some(row) = counts.get(layer) else { continue };
        let mut order: Vec<usize> = (0..row.len()).filter(|&e| row[e] > 0).collect();
        order.sort_by(|&a, &b| row[b].cmp(&row[a]).then(a.cmp(&b)));
        pinned.extend(order.into_iter().take(per_layer).map(|e| (layer, e)));
    }
    pinned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(clock: u64, pass: u64) -> SlotUse {
        let mut s = SlotUse::arrived(clock, pass, false);
        s.touch(clock, pass);
        s
    }

    #[test]
    fn least_stale_keeps_the_next_layers_expert_that_lru_evicts() {
        // Four layers, pass 1 at layer 1. From pass 0: layer 2's expert (clock 3) and layer 3's
        // (clock 4); from pass 1: layer 0's (clock 5).
        let slots = [((2, 0), used(3, 0)), ((3, 0), used(4, 0)), ((0, 0), used(5, 1))];
        let none = HashSet::new();
        let now = Moment { pass: 1, layer: 1, cycle: 4, predicted: &none, usage: &[] };
        let iter = slots.iter().map(|(id, s)| (*id, s));
        // LRU gives up the expert the very next layer may need.
        assert_eq!(EvictionPolicy::Lru.victim(iter.clone(), &none, &now), Some((2, 0)));
        assert_eq!(EvictionPolicy::LeastStale.victim(iter.clone(), &none, &now), Some((3, 0)));
        let keep: HashSet<ExpertId> = [(3, 0)].into();
        assert_eq!(EvictionPolicy::LeastStale.victim(iter.clone(), &keep, &now), Some((2, 0)));
        // A prediction for layer 3 keeps its expert; layer 2's goes instead.
        let predicted: HashSet<ExpertId> = [(3, 0)].into();
        let ahead = Moment { predicted: &predicted, ..now };
        assert_eq!(EvictionPolicy::Lookahead.victim(iter.clone(), &none, &ahead), Some((2, 0)));
        // lookahead-lfu keeps the prediction too; of the rest, the expert used least overall
        // goes, however recently: layer 0's, used once against layer 2's three times.
        let usage = vec![vec![1], vec![], vec![3], vec![2]];
        let counted = Moment { usage: &usage, ..ahead };
        assert_eq!(EvictionPolicy::LookaheadLfu.victim(iter.clone(), &none, &counted), Some((0, 0)));
        assert_eq!(EvictionPolicy::LookaheadLfu.victim(iter, &[(0, 0)].into(), &counted), Some((2, 0)));
    }

    #[test]
    fn lfru_decays_by_half_per_pass_and_pins_go_last() {
        let mut often = used(1, 0);
        often.touch(2, 1);
        often.touch(3, 2); // 1/4 + 1/2 + 1 = 1.75 at pass 2
        assert!((often.decayed(2) - 1.75).abs() < 1e-12);
        let once = used(4, 2); // 1.0
        let mut pinned = used(0, 0);
        pinned.pinned = true;
        let slots = [((0, 0), often), ((0, 1), once), ((0, 2), pinned)];
        let none = HashSet::new();
        let now = Moment { pass: 2, layer: 0, cycle: 1, predicted: &none, usage: &[] };
        let iter = slots.iter().map(|(id, s)| (*id, s));
        assert_eq!(EvictionPolicy::Lfru.victim(iter.clone(), &none, &now), Some((0, 1)));
        let keep: HashSet<ExpertId> = [(0, 0), (0, 1)].into();
        assert_eq!(EvictionPolicy::Lfru.victim(iter.clone(), &keep, &now), Some((0, 2)));
        let all: HashSet<ExpertId> = [(0, 0), (0, 1), (0, 2)].into();
        assert_eq!(EvictionPolicy::Lfu.victim(iter, &all, &now), None);
    }

    #[test]
    fn most_used_pins_the_top_counts_of_each_layer() {
        let counts = vec![vec![3, 0, 5, 3], vec![], vec![0, 1, 0, 0]];
        let pins = most_used(&counts, &[0, 2], 2);
        assert_eq!(pins, [(0, 2), (0, 0), (2, 1)].into());
    }
}
