//! Router decisions on the host: which experts each token uses and with what weight.
//!
//! Router logits are read back from the GPU once per MoE layer; the choice is made here because
//! the expert manager (also on the host) must know it before expert compute is scheduled.

use crate::spec::RouterKind;

/// One token's chosen experts, in the order the reference picks them (descending probability),
/// with the weights their outputs are scaled by.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Routes every token. `logits` is row-major `[tokens, num_experts]`.
pub fn route(logits: &[f32], num_experts: usize, top_k: usize, kind: RouterKind) -> Vec<TokenRoute> {
    logits
        .chunks_exact(num_experts)
        .map(|row| match kind {
            RouterKind::SoftmaxTopK { renormalize } => softmax_top_k(row, top_k, renormalize),
        })
        .collect()
}

fn softmax_top_k(row: &[f32], top_k: usize, renormalize: bool) -> TokenRoute {
    let probs = softmax(row);
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Stable: equal probabilities keep the lower expert index first, as torch.topk does on CPU.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order.truncate(top_k);
    let mut weights: Vec<f32> = order.iter().map(|&e| probs[e]).collect();
    if renormalize {
        let sum: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    TokenRoute { experts: order.into_iter().map(|e| e as u32).collect(), weights }
}

/// Softmax in f32 with the max subtracted, as torch computes it.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_logits_in_descending_order() {
        let routes = route(&[0.1, 2.0, -1.0, 1.0], 4, 2, RouterKind::SoftmaxTopK { renormalize: false });
        assert_eq!(routes[0].experts, vec![1, 3]);
        let p = softmax(&[0.1, 2.0, -1.0, 1.0]);
        assert_eq!(routes[0].weights, vec![p[1], p[3]]);
    }

    #[test]
    fn renormalised_weights_sum_to_one_and_equal_softmax_over_the_top_k() {
        let routes = route(&[0.1, 2.0, -1.0, 1.0], 4, 2, RouterKind::SoftmaxTopK { renormalize: true });
        let w = &routes[0].weights;
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        let top = softmax(&[2.0, 1.0]);
        assert!((w[0] - top[0]).abs() < 1e-6 && (w[1] - top[1]).abs() < 1e-6);
    }

    #[test]
    fn each_row_is_routed_independently() {
        let routes = route(&[5.0, 0.0, 0.0, 5.0], 2, 1, RouterKind::SoftmaxTopK { renormalize: true });
        assert_eq!(routes[0].experts, vec![0]);
        assert_eq!(routes[1].experts, vec![1]);
        assert_eq!(routes[1].weights, vec![1.0]);
    }
}
