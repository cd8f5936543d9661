//! Which resident expert gives up its slot when a miss needs one.

use crate::error::{FerryError, Result};

/// `--expert-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used (ties: least recently used).
    Lfu,
    /// The most used experts of each layer (from the prompt's routing or a saved profile) are
    /// pinned; the rest is LRU.
    LfuPinned,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = FerryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lru" => Ok(Self::Lru),
            "lfu" => Ok(Self::Lfu),
            "lfu-pinned" => Ok(Self::LfuPinned),
            other => Err(FerryError::flag(
                "--expert-policy",
                format!("unknown policy {other:?}; use lru, lfu or lfu-pinned"),
            )),
        }
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lru => "lru",
            Self::Lfu => "lfu",
            Self::LfuPinned => "lfu-pinned",
        })
    }
}

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
