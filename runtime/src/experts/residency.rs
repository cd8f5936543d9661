//! A picture of the expert cache for people (the desktop app's residency map): where each
//! expert is now, and what happened to it since the previous picture.

use std::collections::HashMap;

/// Where an expert's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Only in host memory.
    Host,
    /// In a GPU slot.
    Resident,
    /// In a GPU slot and kept there by `lfu-pinned`.
    Pinned,
    /// A prediction is staging it; its slot is reserved.
    Uploading,
}

/// The most telling thing that happened to an expert since the previous picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Used from its slot.
    Hit,
    /// Used after a prediction brought it in.
    PrefetchHit,
    /// Uploaded on demand.
    Miss,
    /// Not resident, computed on the host (`--miss-policy cpu|auto`).
    Host,
    /// Lost its slot.
    Evicted,
}

impl Access {
    /// A miss outranks a hit of the same expert in one step, so the map shows what cost time.
    fn rank(self) -> u8 {
        match self {
            Self::Evicted => 0,
            Self::Hit => 1,
            Self::PrefetchHit => 2,
            Self::Host => 3,
            Self::Miss => 4,
        }
    }
}

/// One expert of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExpertCell {
    pub state: SlotState,
    /// Since the previous picture; None when untouched.
    pub access: Option<Access>,
    /// Uses since the cache was made.
    pub uses: u64,
    pub hits: u64,
    pub misses: u64,
    /// The cache clock at its last use (0: never used); the picture's `clock` is now.
    pub last_use: u64,
}

/// The whole cache at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Residency {
    /// `[layer][expert]`; empty for dense layers.
    pub layers: Vec<Vec<ExpertCell>>,
    /// Bytes of one expert in its GPU slot.
    pub expert_bytes: u64,
    /// GPU slots under the current budget.
    pub slots: usize,
    /// The cache clock (one tick per expert use).
    pub clock: u64,
    /// Big-little: the last pass's decision per layer and token (true: big); empty when off.
    pub big: Vec<Vec<bool>>,
}

/// Per-expert counters and the events since the previous picture, kept by the cache.
#[derive(Debug, Default)]
pub(crate) struct AccessLog {
    hits: HashMap<(usize, usize), u64>,
    misses: HashMap<(usize, usize), u64>,
    last_use: HashMap<(usize, usize), u64>,
    recent: HashMap<(usize, usize), Access>,
}

impl AccessLog {
    /// Notes an event at cache clock `clock`.
    pub(crate) fn record(&mut self, id: (usize, usize), access: Access, clock: u64) {
        if access != Access::Evicted {
            self.last_use.insert(id, clock);
        }
        match access {
            Access::Hit | Access::PrefetchHit => *self.hits.entry(id).or_default() += 1,
            Access::Miss | Access::Host => *self.misses.entry(id).or_default() += 1,
            Access::Evicted => {}
        }
        let slot = self.recent.entry(id).or_insert(access);
        if access.rank() >= slot.rank() {
            *slot = access;
        }
    }

    /// Hits, misses and the clock of the last use.
    pub(crate) fn counts(&self, id: (usize, usize)) -> (u64, u64, u64) {
        let get = |map: &HashMap<(usize, usize), u64>| map.get(&id).copied().unwrap_or(0);
        (get(&self.hits), get(&self.misses), get(&self.last_use))
    }

    /// The events since the last call, clearing them.
    pub(crate) fn take_recent(&mut self) -> HashMap<(usize, usize), Access> {
        std::mem::take(&mut self.recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_outranks_a_later_hit_and_taking_clears_the_events_but_not_the_counts() {
        let mut log = AccessLog::default();
        log.record((0, 1), Access::Miss, 1);
        log.record((0, 1), Access::Hit, 2);
        log.record((0, 2), Access::Evicted, 3);
        log.record((0, 2), Access::Hit, 4);
        let recent = log.take_recent();
        assert_eq!(recent[&(0, 1)], Access::Miss);
        assert_eq!(recent[&(0, 2)], Access::Hit);
        assert!(log.take_recent().is_empty());
        assert_eq!(log.counts((0, 1)), (1, 1, 2));
        assert_eq!(log.counts((0, 2)), (1, 0, 4));
    }
}
