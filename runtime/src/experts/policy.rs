//! Which resident expert gives up its slot when a miss needs one.

use crate::options::EvictionPolicy;

/// What a policy knows about a resident expert.
#[derive(Debug, Clone, Copy)]
pub struct SlotUse {
    pub last_use: u64,
    pub uses: u64,
    pub pinned: bool,
}

impl EvictionPolicy {
    /// Orders eviction candidates: smaller keys are evicted first.
    pub fn victim_key(self, slot: &SlotUse) -> (u64, u64) {
        match self {
            Self::Lru | Self::LfuPinned => (slot.last_use, 0),
            Self::Lfu => (slot.uses, slot.last_use),
        }
    }
}
