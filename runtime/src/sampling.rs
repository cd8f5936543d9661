//! Choosing the next token from logits: greedy, or temperature with top-k, top-p and min-p,
//! after an optional repetition penalty. Order and semantics follow transformers' processors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0.0: off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already seen tokens by this (1.0: off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.7, top_k: 0, top_p: 0.9, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Picks a token id. `history` is every token so far (prompt and generated), for the penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        if self.config.repetition_penalty != 1.0 {
            apply_repetition_penalty(&mut logits, history, self.config.repetition_penalty);
        }
        if self.config.temperature <= 0.0 {
            return argmax(&logits);
        }
        let probs = self.filtered_probs(&logits);
        let draw: f32 = self.rng.random();
        let mut acc = 0.0;
        let mut last = 0;
        for (id, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                acc += p;
                last = id;
                if draw < acc {
                    return id as u32;
                }
            }
        }
        last as u32
    }

    /// Probabilities after temperature, top-k, top-p and min-p, renormalised.
    fn filtered_probs(&self, logits: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let scaled: Vec<f32> = logits.iter().map(|l| l / c.temperature).collect();
        let mut order: Vec<usize> = (0..scaled.len()).collect();
        order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
        let mut keep = vec![false; scaled.len()];
        let k = if c.top_k == 0 { scaled.len() } else { c.top_k.min(scaled.len()) };
        let probs = crate::routing::softmax(&scaled);
        let mut mass = 0.0;
        for (rank, &id) in order.iter().enumerate().take(k) {
            // top-p keeps tokens until the mass before them reaches p (always at least one).
            if rank > 0 && mass >= c.top_p {
                break;
            }
            if rank > 0 && probs[id] < c.min_p * probs[order[0]] {
                break;
            }
            keep[id] = true;
            mass += probs[id];
        }
        let total: f32 = probs.iter().zip(&keep).filter(|(_, k)| **k).map(|(p, _)| p).sum();
        probs.iter().zip(&keep).map(|(p, k)| if *k { p / total } else { 0.0 }).collect()
    }
}

/// Index of the largest logit; the first one on ties, as torch.argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in history {
        if let Some(s) = seen.get_mut(id as usize) {
            *s = true;
        }
    }
    for (logit, seen) in logits.iter_mut().zip(seen) {
        if seen {
            *logit = if *logit < 0.0 { *logit * penalty } else { *logit / penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::greedy());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let mut config = SamplingConfig::greedy();
        config.repetition_penalty = 2.0;
        let mut s = Sampler::new(config);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
        assert_eq!(s.sample(&[-1.0, -0.6, -2.0], &[1]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_seed() {
        for seed in 0..20 {
            let config =
                SamplingConfig { temperature: 1.0, top_k: 1, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed };
            assert_eq!(Sampler::new(config).sample(&[0.5, 0.1, 0.9, 0.2], &[]), 2);
        }
    }

    #[test]
    fn top_p_and_min_p_remove_the_tail() {
        let config =
            SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, repetition_penalty: 1.0, seed: 1 };
        let probs = Sampler::new(config).filtered_probs(&[3.0, 2.0, 0.0, -1.0]);
        assert!(probs[0] > 0.99 && probs[2] == 0.0 && probs[3] == 0.0, "{probs:?}");
        let config =
            SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.2, repetition_penalty: 1.0, seed: 1 };
        let probs = Sampler::new(config).filtered_probs(&[3.0, 2.0, 0.0, -1.0]);
        assert!(probs[1] > 0.0 && probs[2] == 0.0, "{probs:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_samples() {
        let config =
            SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 7 };
        let logits = [0.1, 0.2, 0.3, 0.4, 0.5];
        let a: Vec<u32> = {
            let mut s = Sampler::new(config.clone());
            (0..32).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(config);
            (0..32).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should not be constant: {a:?}");
    }
}
