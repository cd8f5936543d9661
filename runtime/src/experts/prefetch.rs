//! Prefetching: experts a prediction names are staged on the upload thread into reserved slots
//! while earlier layers compute; each layer's prediction is scored against the routing it then
//! used (recall), and predicted experts never used count as wasted bytes when evicted.

use std::collections::HashSet;
use std::sync::Arc;

use super::cache::{ExpertCache, ExpertId};
use super::transfer::{StagedExpert, UploadQueue};
use crate::options::LinkModel;

/// How well predictions for one layer matched the routing it then used.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LayerRecall {
    /// Real (token, expert) choices that had been predicted.
    pub predicted: u64,
    /// All real (token, expert) choices scored.
    pub actual: u64,
}

impl LayerRecall {
    pub fn recall(&self) -> Option<f64> {
        (self.actual > 0).then(|| self.predicted as f64 / self.actual as f64)
    }
}

impl ExpertCache {
    /// Starts bringing in `experts` of `layer` (a prediction), in slots freed by the policy but
    /// never by evicting `protect` (the experts the current layer still needs) or each other.
    /// Experts already resident or under way are skipped; when no slot can be freed the rest
    /// of the prediction is dropped. Returns how many were requested.
    pub(super) fn prefetch(&mut self, layer: usize, experts: &[usize], protect: &[(usize, usize)]) -> usize {
        self.settle_orphans();
        let mut keep: HashSet<ExpertId> = protect.iter().copied().collect();
        keep.extend(experts.iter().map(|&e| (layer, e)));
        let mut requested = 0;
        for &expert in experts {
            let id = (layer, expert);
            if self.slots.contains_key(&id) || self.in_flight.contains(&id) {
                continue;
            }
            while self.occupied() >= self.plan.slots {
                if !self.evict_one(&keep) {
                    return requested;
                }
            }
            if self.queue.is_none() {
                self.queue = Some(UploadQueue::start(Arc::clone(&self.store), self.link, self.plan.slot_bytes));
            }
            // The upload thread fills a staging buffer, if one is free, straight from the map.
            let ticket = self.pool.reserve();
            if self.queue.as_ref().is_some_and(|q| q.request(layer, expert, ticket)) {
                self.in_flight.insert(id);
                self.stats.prefetched += 1;
                self.stats.bytes_uploaded += self.plan.slot_bytes;
                requested += 1;
            }
        }
        requested
    }

    /// Records the experts predicted for each token of `layer` in this pass.
    pub(super) fn record_prediction(&mut self, layer: usize, per_token: Vec<Vec<u32>>) {
        self.predictions.insert(layer, per_token);
    }

    /// Scores this pass's prediction for `layer` against the routing it really used, once the
    /// layer has fetched its experts. Predicted experts it did not use become ordinary slots
    /// (marked unused, so evicting them counts as wasted prefetch) as their staging completes.
    pub(super) fn score_prediction(&mut self, layer: usize, actual: &[Vec<u32>]) {
        let unused: Vec<ExpertId> = self.in_flight.iter().filter(|(l, _)| *l == layer).copied().collect();
        self.orphans.extend(unused);
        self.settle_orphans();
        let Some(predicted) = self.predictions.remove(&layer) else { return };
        let entry = &mut self.recall[layer];
        for (real, guess) in actual.iter().zip(&predicted) {
            entry.actual += real.len() as u64;
            entry.predicted += real.iter().filter(|e| guess.contains(e)).count() as u64;
        }
    }

    /// Collects what the stager has finished without waiting, and makes finished orphans
    /// resident.
    pub(super) fn settle_orphans(&mut self) {
        if let Some(queue) = &self.queue {
            while let Some(staged) = queue.try_next() {
                self.staged.insert((staged.layer, staged.expert), staged);
            }
        }
        let ready: Vec<ExpertId> = self.orphans.iter().filter(|id| self.staged.contains_key(id)).copied().collect();
        for id in ready {
            self.orphans.remove(&id);
            self.in_flight.remove(&id);
            if let Some(staged) = self.staged.remove(&id) {
                // A slot was reserved for it; a failed copy only loses the prefetch.
                let _ = self.occupy(id, staged.weights, self.clock, true);
            }
        }
    }

    /// Waits for the stager to deliver `id`, keeping what arrives for others.
    pub(super) fn wait_staged(&mut self, id: ExpertId) -> Option<StagedExpert> {
        self.in_flight.remove(&id);
        self.orphans.remove(&id);
        if let Some(staged) = self.staged.remove(&id) {
            return Some(staged);
        }
        let queue = self.queue.as_ref()?;
        while let Some(staged) = queue.next() {
            let got = (staged.layer, staged.expert);
            if got == id {
                return Some(staged);
            }
            self.staged.insert(got, staged);
        }
        None
    }

    /// Turns every prefetch still under way into a resident slot (before reconfiguring).
    pub(super) fn drain_in_flight(&mut self) {
        let ids: Vec<ExpertId> = self.in_flight.iter().copied().collect();
        for id in ids {
            if let Some(staged) = self.wait_staged(id) {
                let _ = self.occupy(id, staged.weights, self.clock, true);
            }
        }
        self.staged.clear();
        self.orphans.clear();
    }

    /// Prediction recall per layer since the cache was made (None where nothing was scored).
    pub fn recall(&self) -> &[LayerRecall] {
        &self.recall
    }

    /// Emulates a host-to-GPU link of this speed for every upload (None: as fast as it goes).
    pub fn set_link(&mut self, link: Option<LinkModel>) {
        self.drain_in_flight();
        self.link = link;
        self.queue = None;
    }

    /// How misses are uploaded from now on.
    pub fn set_upload(&mut self, path: crate::options::UploadPath) {
        self.pool.set_upload(path);
    }

    /// Experts uploaded through Ferry's staging ring so far (the others went through burn).
    pub fn staged_uploads(&self) -> u64 {
        self.pool.staged_uploads()
    }

    pub fn link(&self) -> Option<LinkModel> {
        self.link
    }
}
