//! Counters of the expert cache: what was found, what had to be uploaded, and what it cost.

use std::ops::{Add, Sub};

/// Cumulative counters; subtract two snapshots for the figures of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ExpertStats {
    /// Expert uses served by a resident slot.
    pub hits: u64,
    /// Expert uses not served by a resident slot: uploaded first, or computed on the host
    /// (`host_computed`).
    pub misses: u64,
    pub evictions: u64,
    /// Bytes copied from host memory to GPU slots.
    pub bytes_uploaded: u64,
    /// Wall time the forward pass waited on uploads (host conversion, the emulated link, and
    /// enqueueing the GPU copy), seconds.
    pub stall_seconds: f64,
    /// Experts requested by a prediction.
    pub prefetched: u64,
    /// Uses served by an expert that a prediction had brought in (counted in `hits` too).
    pub prefetch_hits: u64,
    /// Predicted experts the upload thread wrote straight into a mapped staging buffer: the
    /// compute thread only recorded their GPU copies.
    pub staged_by_thread: u64,
    /// Bytes of predicted experts evicted before any use.
    pub wasted_prefetch_bytes: u64,
    /// Big-little: (token, layer) choices that kept the full top-k.
    pub big: u64,
    /// Big-little: (token, layer) choices that used the top-k/2.
    pub little: u64,
    /// Big choices whose second half needed an expert that was not resident.
    pub fallbacks: u64,
    /// Experts replaced by a resident one (`--big-fallback substitute`).
    pub substitutions: u64,
    /// Big-little with pre-gating: (token, layer) choices whose mode had been predicted one
    /// layer ahead (to stage top-k/2 or top-k experts).
    pub modes_predicted: u64,
    /// Of those, predictions that matched the mode then chosen.
    pub modes_predicted_right: u64,
    /// Predicted little but chosen big: only the first half of the token's experts was staged.
    pub big_predicted_little: u64,
    /// Missed expert uses computed on the host (`--miss-policy cpu|auto`).
    pub host_computed: u64,
    /// Weight bytes the host kernel read.
    pub host_bytes_read: u64,
    /// Wall time of the host kernel, seconds: the GPU computes the layer's resident experts
    /// meanwhile, and the layer's output waits for the host rows.
    pub host_seconds: f64,
    /// `auto`'s decisions: uploads cheaper this step, uploads paid for by expected reuse,
    /// uploads into a free slot paid for by the host's extra time on the expert so far, experts
    /// computed on the host because that was cheaper, and tries made before both rates were
    /// measured.
    pub auto_uploads: u64,
    pub auto_uploads_for_reuse: u64,
    pub auto_uploads_paid_for: u64,
    pub auto_host: u64,
    pub auto_probes: u64,
}

impl ExpertStats {
    pub fn hit_rate(&self) -> f64 {
        let uses = self.hits + self.misses;
        if uses == 0 { 1.0 } else { self.hits as f64 / uses as f64 }
    }

    /// Share of predicted big/little modes that were right (None when none was predicted).
    pub fn mode_prediction_accuracy(&self) -> Option<f64> {
        (self.modes_predicted > 0).then(|| self.modes_predicted_right as f64 / self.modes_predicted as f64)
    }
}

impl Sub for ExpertStats {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        Self {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            evictions: self.evictions - before.evictions,
            bytes_uploaded: self.bytes_uploaded - before.bytes_uploaded,
            stall_seconds: self.stall_seconds - before.stall_seconds,
            prefetched: self.prefetched - before.prefetched,
            prefetch_hits: self.prefetch_hits - before.prefetch_hits,
            staged_by_thread: self.staged_by_thread - before.staged_by_thread,
            wasted_prefetch_bytes: self.wasted_prefetch_bytes - before.wasted_prefetch_bytes,
            big: self.big - before.big,
            little: self.little - before.little,
            fallbacks: self.fallbacks - before.fallbacks,
            substitutions: self.substitutions - before.substitutions,
            modes_predicted: self.modes_predicted - before.modes_predicted,
            modes_predicted_right: self.modes_predicted_right - before.modes_predicted_right,
            big_predicted_little: self.big_predicted_little - before.big_predicted_little,
            host_computed: self.host_computed - before.host_computed,
            host_bytes_read: self.host_bytes_read - before.host_bytes_read,
            host_seconds: self.host_seconds - before.host_seconds,
            auto_uploads: self.auto_uploads - before.auto_uploads,
            auto_uploads_for_reuse: self.auto_uploads_for_reuse - before.auto_uploads_for_reuse,
            auto_uploads_paid_for: self.auto_uploads_paid_for - before.auto_uploads_paid_for,
            auto_host: self.auto_host - before.auto_host,
            auto_probes: self.auto_probes - before.auto_probes,
        }
    }
}

impl Add for ExpertStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            evictions: self.evictions + other.evictions,
            bytes_uploaded: self.bytes_uploaded + other.bytes_uploaded,
            stall_seconds: self.stall_seconds + other.stall_seconds,
            prefetched: self.prefetched + other.prefetched,
            prefetch_hits: self.prefetch_hits + other.prefetch_hits,
            staged_by_thread: self.staged_by_thread + other.staged_by_thread,
            wasted_prefetch_bytes: self.wasted_prefetch_bytes + other.wasted_prefetch_bytes,
            big: self.big + other.big,
            little: self.little + other.little,
            fallbacks: self.fallbacks + other.fallbacks,
            substitutions: self.substitutions + other.substitutions,
            modes_predicted: self.modes_predicted + other.modes_predicted,
            modes_predicted_right: self.modes_predicted_right + other.modes_predicted_right,
            big_predicted_little: self.big_predicted_little + other.big_predicted_little,
            host_computed: self.host_computed + other.host_computed,
            host_bytes_read: self.host_bytes_read + other.host_bytes_read,
            host_seconds: self.host_seconds + other.host_seconds,
            auto_uploads: self.auto_uploads + other.auto_uploads,
            auto_uploads_for_reuse: self.auto_uploads_for_reuse + other.auto_uploads_for_reuse,
            auto_uploads_paid_for: self.auto_uploads_paid_for + other.auto_uploads_paid_for,
            auto_host: self.auto_host + other.auto_host,
            auto_probes: self.auto_probes + other.auto_probes,
        }
    }
}
