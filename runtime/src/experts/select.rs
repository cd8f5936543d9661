//! Big-little experts (MoBiLE, Zhao et al., arXiv 2510.12357): important tokens keep the full
//! top-k ("big"), unimportant ones use the top-k/2 of the same ranking ("little"), with weights
//! rescaled so the used experts carry the same total weight.
//!
//! The paper's own importance score was not available to us: the stored copies of arXiv
//! 2510.12357 hold only its abstract ("reduces the number of experts for unimportant tokens to
//! half ... while maintaining full experts for important tokens") and third-party summaries,
//! none of which define the score or the fallback rule. So scores are plug-ins compared by
//! measured quality and speed (`ferry eval`, `ferry bench`): the router probability mass the
//! little half would drop, the router's entropy, and the attention a token receives. All are
//! read from the same layer (its router, or its attention), so the choice is made per token and
//! per layer.

use std::collections::{HashMap, VecDeque};

use crate::error::{FerryError, Result};
use crate::options::{BigFallback, BigLittle, Importance};
use crate::routing::{TokenRoute, softmax};

/// Counters of the big/little choice, per (token, layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SelectionStats {
    pub big: u64,
    pub little: u64,
    /// Big choices whose second half needed an expert that was not resident.
    pub fallbacks: u64,
    /// Experts replaced by a resident one (`--big-fallback substitute`).
    pub substitutions: u64,
    /// Pre-gating: (token, layer) choices whose mode had been predicted one layer ahead.
    pub modes_predicted: u64,
    /// Of those, predictions that matched the mode then chosen.
    pub modes_predicted_right: u64,
    /// Predicted little but chosen big: the token's second half was not staged.
    pub big_predicted_little: u64,
}

impl SelectionStats {
    /// Adds another selector's counts (one that was replaced or turned off).
    pub fn absorb(&mut self, other: &Self) {
        self.big += other.big;
        self.little += other.little;
        self.fallbacks += other.fallbacks;
        self.substitutions += other.substitutions;
        self.modes_predicted += other.modes_predicted;
        self.modes_predicted_right += other.modes_predicted_right;
        self.big_predicted_little += other.big_predicted_little;
    }
}

/// Recent importance scores per layer, to turn a target big fraction into a threshold during
/// decode (one token at a time has no batch to rank within).
const HISTORY: usize = 256;

/// Decode steps per layer after which decode scores are ranked among decode scores only.
const DECODE_WARMUP: usize = 16;

/// Chooses big or little per token and rewrites its route.
pub struct Selector {
    pub config: BigLittle,
    history: Vec<VecDeque<f32>>,
    /// Recent scores of single-token (decode) passes per layer: a decode score is ranked among
    /// these once there are `DECODE_WARMUP` of them, since decode scores can be distributed
    /// differently from a prompt's (attention received by one query, say).
    decode_history: Vec<VecDeque<f32>>,
    /// The latest decision per layer and token (true: big), for display.
    last_big: Vec<Vec<bool>>,
    /// Per layer: the modes a pre-gate expected for each token of the current pass.
    expected: HashMap<usize, Vec<bool>>,
    pub stats: SelectionStats,
}

impl Selector {
    pub fn new(config: BigLittle, layers: usize) -> Self {
        Self {
            config,
            history: vec![VecDeque::new(); layers],
            decode_history: vec![VecDeque::new(); layers],
            last_big: vec![Vec::new(); layers],
            expected: HashMap::new(),
            stats: SelectionStats::default(),
        }
    }

    /// The token's importance from its full router probabilities and its top-k route, or from
    /// the attention it received in the layer (`received`; callers of `Importance::Attention`
    /// must supply it, see `Selector::apply`).
    pub fn score(&self, probs: &[f32], route: &TokenRoute, received: Option<f32>) -> f32 {
        match self.config.importance {
            Importance::Attention => received.unwrap_or(0.0),
            Importance::DroppedMass => {
                let k = route.experts.len();
                let total: f32 = route.experts.iter().map(|&e| probs[e as usize]).sum();
                let kept: f32 = route.experts[..k.div_ceil(2)].iter().map(|&e| probs[e as usize]).sum();
                if total > 0.0 { 1.0 - kept / total } else { 0.0 }
            }
            Importance::Entropy => probs.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum(),
        }
    }

    /// Decides, for each token of a pass through `layer`, whether it is big: the highest
    /// `big_fraction` of this batch's scores in a prefill, or above the running threshold of
    /// recent scores when decoding one token.
    pub fn decide(&mut self, layer: usize, scores: &[f32]) -> Vec<bool> {
        let big = self.expect(layer, scores);
        self.last_big[layer].clone_from(&big);
        let record = |history: &mut VecDeque<f32>| {
            for &s in scores {
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(s);
            }
        };
        record(&mut self.history[layer]);
        if scores.len() == 1 {
            record(&mut self.decode_history[layer]);
        }
        big
    }

    /// The latest decision per layer and token (true: big); empty for layers not seen yet.
    pub fn last_big(&self) -> &[Vec<bool>] {
        &self.last_big
    }

    /// What `decide` would choose for these scores at `layer` now, without recording them in
    /// the layer's history (a pre-gate's guess must not move the threshold the real choice uses).
    pub fn expect(&self, layer: usize, scores: &[f32]) -> Vec<bool> {
        let fraction = self.config.big_fraction.clamp(0.0, 1.0);
        let decode = &self.decode_history[layer];
        let history = if decode.len() >= DECODE_WARMUP { decode } else { &self.history[layer] };
        let mut pool: Vec<f32> = if scores.len() > 1 { scores.to_vec() } else { history.iter().copied().collect() };
        if pool.is_empty() {
            // Nothing seen yet: the first token is big, to be safe.
            return vec![true; scores.len()];
        }
        pool.sort_by(f32::total_cmp);
        let bigs = (fraction * pool.len() as f32).round() as usize;
        if bigs == 0 {
            return vec![false; scores.len()];
        }
        if bigs == pool.len() {
            // Everything big, also a decode score below every recent one.
            return vec![true; scores.len()];
        }
        let threshold = pool[pool.len() - bigs];
        scores.iter().map(|&s| s >= threshold).collect()
    }

    /// Records the modes a pre-gate expects `layer`'s tokens to take in this pass.
    pub fn record_expected(&mut self, layer: usize, big: Vec<bool>) {
        self.expected.insert(layer, big);
    }

    /// Scores the expected modes of `layer` (if any were recorded) against the chosen ones.
    pub fn score_expected(&mut self, layer: usize, chosen: &[bool]) {
        let Some(expected) = self.expected.remove(&layer) else { return };
        for (&guess, &big) in expected.iter().zip(chosen) {
            self.stats.modes_predicted += 1;
            self.stats.modes_predicted_right += u64::from(guess == big);
            self.stats.big_predicted_little += u64::from(big && !guess);
        }
    }

    /// Applies the selection to a layer's routes. `logits` are the router's, row-major
    /// `[tokens, experts]`; `received` the attention each token received in this layer's
    /// attention, required by `--importance attention`; `resident` says whether an expert of
    /// the layer is in (or on its way to) a GPU slot, for the big tokens' fallback.
    pub fn apply(
        &mut self,
        layer: usize,
        routes: &mut [TokenRoute],
        logits: &[f32],
        num_experts: usize,
        received: Option<&[f32]>,
        resident: impl Fn(usize) -> bool,
    ) -> Result<()> {
        if self.config.importance == Importance::Attention && received.is_none_or(|r| r.len() != routes.len()) {
            return Err(FerryError::flag(
                "--importance attention",
                format!("layer {layer}: the attention received by each token was not computed"),
            ));
        }
        let probs: Vec<Vec<f32>> = logits.chunks_exact(num_experts).map(softmax).collect();
        let scores: Vec<f32> =
            routes.iter().zip(&probs).enumerate().map(|(t, (r, p))| self.score(p, r, received.map(|a| a[t]))).collect();
        let big = self.decide(layer, &scores);
        self.score_expected(layer, &big);
        for ((route, probs), big) in routes.iter_mut().zip(&probs).zip(big) {
            if !big {
                self.stats.little += 1;
                Self::make_little(route);
                continue;
            }
            self.stats.big += 1;
            let half = route.experts.len().div_ceil(2);
            if route.experts[half..].iter().any(|&e| !resident(e as usize)) {
                self.stats.fallbacks += 1;
                if self.config.fallback == BigFallback::Substitute {
                    self.substitute(route, probs, &resident);
                }
            }
        }
        Ok(())
    }

    /// With a pre-gate: whether each token is expected to be big in `layer`, from the
    /// pre-gate's predicted router logits `[tokens, experts]` and top-k routes, scored with the
    /// same importance and held against the same threshold that layer will use, without adding
    /// to its history. Attention importance cannot see the later layer's attention yet, so the
    /// attention each token received in the predicting layer (`received`) stands in for it.
    /// The expectation is recorded and scored when `layer` chooses.
    pub fn expect_big(
        &mut self,
        layer: usize,
        logits: &[f32],
        num_experts: usize,
        routes: &[TokenRoute],
        received: Option<&[f32]>,
    ) -> Vec<bool> {
        let scores: Vec<f32> = logits
            .chunks_exact(num_experts)
            .zip(routes)
            .enumerate()
            .map(|(t, (row, r))| self.score(&softmax(row), r, received.map(|a| a[t])))
            .collect();
        let big = self.expect(layer, &scores);
        self.record_expected(layer, big.clone());
        big
    }

    /// Rewrites a little token's route to its first k/2 experts, rescaling their weights to the
    /// full route's total.
    pub fn make_little(route: &mut TokenRoute) {
        let total: f32 = route.weights.iter().sum();
        let keep = route.experts.len().div_ceil(2);
        route.experts.truncate(keep);
        route.weights.truncate(keep);
        let kept: f32 = route.weights.iter().sum();
        if kept > 0.0 {
            route.weights.iter_mut().for_each(|w| *w *= total / kept);
        }
    }

    /// For a big token under `substitute`: replaces second-half experts that are not resident by
    /// the best-ranked resident experts not already chosen (weights keep their rank's value).
    pub fn substitute(&mut self, route: &mut TokenRoute, probs: &[f32], resident: impl Fn(usize) -> bool) {
        let half = route.experts.len().div_ceil(2);
        let mut ranking: Vec<usize> = (0..probs.len()).collect();
        ranking.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut i = half;
        while i < route.experts.len() {
            if resident(route.experts[i] as usize) {
                i += 1;
                continue;
            }
            let replacement = ranking.iter().copied().find(|&e| resident(e) && !route.experts.contains(&(e as u32)));
            self.stats.substitutions += 1;
            match replacement {
                Some(e) => {
                    route.experts[i] = e as u32;
                    i += 1;
                }
                None => {
                    route.experts.remove(i);
                    route.weights.remove(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(experts: &[u32], weights: &[f32]) -> TokenRoute {
        TokenRoute { experts: experts.to_vec(), weights: weights.to_vec() }
    }

    #[test]
    fn little_keeps_the_first_half_with_the_same_total_weight() {
        let mut r = route(&[3, 1, 0, 2], &[0.4, 0.2, 0.1, 0.1]);
        Selector::make_little(&mut r);
        assert_eq!(r.experts, vec![3, 1]);
        assert!((r.weights[0] - 0.8 * 0.4 / 0.6).abs() < 1e-6 && (r.weights[1] - 0.8 * 0.2 / 0.6).abs() < 1e-6);
    }

    #[test]
    fn dropped_mass_is_high_when_the_second_half_matters() {
        let s = Selector::new(
            BigLittle { importance: Importance::DroppedMass, big_fraction: 0.5, fallback: BigFallback::Fetch },
            1,
        );
        let probs = [0.5, 0.3, 0.1, 0.1];
        assert!((s.score(&probs, &route(&[0, 1], &[0.5, 0.3]), None) - 0.375).abs() < 1e-6);
        let sure = [0.97, 0.01, 0.01, 0.01];
        assert!(s.score(&sure, &route(&[0, 1], &[0.97, 0.01]), None) < 0.02);
    }

    #[test]
    fn the_big_fraction_picks_the_highest_scores_in_a_batch_and_by_history_in_decode() {
        let mut s = Selector::new(
            BigLittle { importance: Importance::Entropy, big_fraction: 0.25, fallback: BigFallback::Fetch },
            1,
        );
        assert_eq!(s.decide(0, &[0.1, 0.9, 0.3, 0.2]), vec![false, true, false, false]);
        assert_eq!(s.decide(0, &[0.95]), vec![true]);
        assert_eq!(s.decide(0, &[0.15]), vec![false]);
    }

    #[test]
    fn decode_scores_distributed_unlike_the_prompts_still_meet_the_big_fraction() {
        let mut s = Selector::new(
            BigLittle { importance: Importance::Entropy, big_fraction: 0.25, fallback: BigFallback::Fetch },
            1,
        );
        // A prompt of high scores, then decode scores far below all of them.
        s.decide(0, &(0..32).map(|i| 10.0 + i as f32).collect::<Vec<_>>());
        let decode: Vec<f32> = (0..200).map(|i| ((i * 37) % 100) as f32 / 100.0).collect();
        let big: usize = decode.iter().map(|&x| usize::from(s.decide(0, &[x])[0])).sum();
        let share = big as f64 / decode.len() as f64;
        assert!((share - 0.25).abs() < 0.08, "decode big share {share}");
    }

    #[test]
    fn expecting_a_mode_leaves_the_decode_threshold_alone_and_is_scored() {
        let mut s = Selector::new(
            BigLittle { importance: Importance::Entropy, big_fraction: 0.5, fallback: BigFallback::Fetch },
            1,
        );
        s.decide(0, &[0.1, 0.2, 0.3, 0.4]);
        assert_eq!(s.expect(0, &[0.35]), vec![true]);
        // Recorded as history, these would lift the threshold above 0.35.
        for _ in 0..8 {
            assert_eq!(s.expect(0, &[5.0]), vec![true]);
        }
        s.record_expected(0, vec![false]);
        let chosen = s.decide(0, &[0.35]);
        assert_eq!(chosen, vec![true]);
        s.score_expected(0, &chosen);
        assert_eq!((s.stats.modes_predicted, s.stats.modes_predicted_right, s.stats.big_predicted_little), (1, 0, 1));
        s.score_expected(0, &chosen);
        assert_eq!(s.stats.modes_predicted, 1, "an expectation is scored once");
    }

    #[test]
    fn a_big_fraction_of_one_keeps_every_decode_token_big() {
        let mut s = Selector::new(
            BigLittle { importance: Importance::Entropy, big_fraction: 1.0, fallback: BigFallback::Fetch },
            1,
        );
        assert_eq!(s.decide(0, &[0.5, 0.6]), vec![true, true]);
        assert_eq!(s.decide(0, &[0.1]), vec![true], "below every recent score");
    }

    #[test]
    fn substitution_takes_the_best_resident_expert() {
        let mut s = Selector::new(
            BigLittle { importance: Importance::Entropy, big_fraction: 1.0, fallback: BigFallback::Substitute },
            1,
        );
        let probs = [0.4, 0.3, 0.2, 0.1];
        let mut r = route(&[0, 1], &[0.4, 0.3]);
        s.substitute(&mut r, &probs, |e| e == 0 || e == 3);
        assert_eq!(r.experts, vec![0, 3]);
        assert_eq!(s.stats.substitutions, 1);
    }
}
