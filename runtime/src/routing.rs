//! Router decisions on the host: which experts each token uses and with what weight.
//!
//! Under `--route-on device` the forward pass routes with a kernel (`ferry_shaders::route`) and
//! reads the result back only where the expert manager must know it before expert compute is
//! scheduled; under `--route-on host`, and for the predictors' guesses, this rule (the same code
//! as the kernel's reference) routes on the host.

use ferry_shaders::route::Rule;

use crate::spec::{GroupScoring, RouterKind};

/// One token's chosen experts, in the order the reference picks them (descending probability),
/// with the weights their outputs are scaled by.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Routes every token. `logits` is row-major `[tokens, num_experts]`; `score_bias` is the
/// per-expert selection bias of routers that have one (DeepSeek-V3). The host twin of the
/// device kernel (`ferry_shaders::route`).
pub fn route(
    logits: &[f32],
    score_bias: Option<&[f32]>,
    num_experts: usize,
    top_k: usize,
    kind: RouterKind,
) -> Vec<TokenRoute> {
    logits
        .chunks_exact(num_experts)
        .map(|row| {
            let (experts, weights) = ferry_shaders::route::reference(row, score_bias, top_k, rule(kind));
            TokenRoute { experts, weights }
        })
        .collect()
}

/// The kernels' name for a family's routing rule.
pub fn rule(kind: RouterKind) -> Rule {
    match kind {
        RouterKind::SoftmaxTopK { renormalize } => Rule::SoftmaxTopK { renormalize },
        RouterKind::TopKSoftmax => Rule::TopKSoftmax,
        RouterKind::Grouped { scoring, groups, topk_groups, renormalize, scaling } => Rule::Grouped {
            sigmoid: scoring == GroupScoring::SigmoidSumTop2,
            groups,
            topk_groups,
            renormalize,
            scaling,
        },
    }
}

pub use ferry_shaders::route::softmax;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_logits_in_descending_order() {
        let routes = route(&[0.1, 2.0, -1.0, 1.0], None, 4, 2, RouterKind::SoftmaxTopK { renormalize: false });
        assert_eq!(routes[0].experts, vec![1, 3]);
        let p = softmax(&[0.1, 2.0, -1.0, 1.0]);
        assert_eq!(routes[0].weights, vec![p[1], p[3]]);
    }

    #[test]
    fn renormalised_weights_sum_to_one_and_equal_softmax_over_the_top_k() {
        let routes = route(&[0.1, 2.0, -1.0, 1.0], None, 4, 2, RouterKind::SoftmaxTopK { renormalize: true });
        let w = &routes[0].weights;
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        let top = softmax(&[2.0, 1.0]);
        assert!((w[0] - top[0]).abs() < 1e-6 && (w[1] - top[1]).abs() < 1e-6);
    }

    #[test]
    fn each_row_is_routed_independently() {
        let routes = route(&[5.0, 0.0, 0.0, 5.0], None, 2, 1, RouterKind::SoftmaxTopK { renormalize: true });
        assert_eq!(routes[0].experts, vec![0]);
        assert_eq!(routes[1].experts, vec![1]);
        assert_eq!(routes[1].weights, vec![1.0]);
    }

    fn grouped(scoring: GroupScoring, renormalize: bool) -> RouterKind {
        RouterKind::Grouped { scoring, groups: 2, topk_groups: 1, renormalize, scaling: 2.0 }
    }

    /// V2: the best group holds the single best expert, so the second best overall (in the
    /// other group) loses to the best group's runner-up; weights are raw probabilities x 2.
    #[test]
    fn v2_keeps_only_the_best_groups_and_scales_raw_probabilities() {
        let logits = [3.0, 1.0, 0.0, 2.5];
        let r = &route(&logits, None, 4, 2, grouped(GroupScoring::SoftmaxMax, false))[0];
        assert_eq!(r.experts, vec![0, 1]);
        let p = softmax(&logits);
        assert_eq!(r.weights, vec![p[0] * 2.0, p[1] * 2.0]);
    }

    /// V3: the bias decides selection and group ranking, the unbiased sigmoid sets the weight.
    #[test]
    fn v3_selects_on_biased_scores_and_weights_by_unbiased_ones() {
        let logits = [0.0, 0.0, 1.0, 1.0];
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let bias = [1.0, 0.5, 0.0, 0.0];
        let r = &route(&logits, Some(&bias), 4, 2, grouped(GroupScoring::SigmoidSumTop2, true))[0];
        assert_eq!(r.experts, vec![0, 1]);
        let (a, b) = (sig(0.0), sig(0.0));
        assert!((r.weights[0] - 2.0 * a / (a + b)).abs() < 1e-6);
        // Without the bias group 1 wins.
        let r = &route(&logits, None, 4, 2, grouped(GroupScoring::SigmoidSumTop2, false))[0];
        assert_eq!(r.experts, vec![2, 3]);
        assert_eq!(r.weights, vec![2.0 * sig(1.0), 2.0 * sig(1.0)]);
    }

    #[test]
    fn top_k_softmax_normalises_over_the_chosen_logits_only() {
        let r = &route(&[0.5, 3.0, -1.0, 2.0], None, 4, 2, RouterKind::TopKSoftmax)[0];
        assert_eq!(r.experts, vec![1, 3]);
        assert_eq!(r.weights, softmax(&[3.0, 2.0]));
    }

    /// Dropped groups count as 0, as in transformers: a negative biased score in a kept group
    /// loses to an expert of a dropped group.
    #[test]
    fn dropped_groups_score_zero_not_minus_infinity() {
        let logits = [0.0, 0.0, 0.0, 0.0];
        let bias = [-0.4, -0.9, -2.0, -2.0];
        let r = &route(&logits, Some(&bias), 4, 2, grouped(GroupScoring::SigmoidSumTop2, false))[0];
        // Group 0 is kept (0.1 + -0.4 > -3); its expert 0 scores 0.1, expert 1 scores -0.4, and
        // the dropped group's experts score 0.0.
        assert_eq!(r.experts, vec![0, 2]);
    }
}
