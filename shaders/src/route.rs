//! Routing on the device: router logits to each token's experts and weights (`route`), and the
//! grouped expert kernel's tables built from them (`tables`), so that a decode step whose
//! experts are all resident never waits for the host between layers.
//!
//! One unit per token walks the token's row in index order, so a token's route does not depend
//! on the batch. Where a model routes on the device, every mode routes with this kernel (the
//! host reads its result where it needs one), so offloaded runs weigh experts with the same bits
//! as resident ones.

use burn::tensor::{DType, Tensor};
use burn_cubecl::tensor::CubeTensor;

use crate::bridge::{ShaderError, cube_float, from_cube};
use crate::expert::DeviceWork;

/// How router logits become expert choices and weights (the families' routing rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Softmax over all experts, top-k on the probabilities; optionally divided by their sum.
    SoftmaxTopK { renormalize: bool },
    /// Top-k on the logits, then softmax over those k (GPT-OSS).
    TopKSoftmax,
    /// DeepSeek's group-limited top-k: softmax scores and a group's best (V2), or sigmoid scores
    /// plus a selection bias and a group's best two (V3, `sigmoid`); the best `topk_groups`
    /// groups keep their scores, the others count as 0; weights are the unbiased scores,
    /// optionally renormalised, times `scaling`.
    Grouped { sigmoid: bool, groups: usize, topk_groups: usize, renormalize: bool, scaling: f32 },
}

impl Rule {
    /// Whether the kernel takes this rule: its group mask is one 32-bit word.
    pub fn on_device(&self) -> bool {
        !matches!(self, Self::Grouped { groups, .. } if *groups > 32)
    }
}

/// Host reference of one token: its experts in the order chosen (descending key, ties to the
/// lower index, as torch.topk on CPU) and their weights.
pub fn reference(row: &[f32], bias: Option<&[f32]>, top_k: usize, rule: Rule) -> (Vec<u32>, Vec<f32>) {
    match rule {
        Rule::SoftmaxTopK { renormalize } => {
            let probs = softmax(row);
            let mut order = descending(&probs);
            order.truncate(top_k);
            let mut weights: Vec<f32> = order.iter().map(|&e| probs[e]).collect();
            if renormalize {
                let sum: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            (indices(order), weights)
        }
        Rule::TopKSoftmax => {
            let mut order = descending(row);
            order.truncate(top_k);
            let top: Vec<f32> = order.iter().map(|&e| row[e]).collect();
            (indices(order), softmax(&top))
        }
        Rule::Grouped { sigmoid, groups, topk_groups, renormalize, scaling } => {
            let scores: Vec<f32> =
                if sigmoid { row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect() } else { softmax(row) };
            let choice: Vec<f32> = match bias {
                Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let per_group = row.len() / groups.max(1);
            let group_scores: Vec<f32> = choice
                .chunks_exact(per_group)
                .map(|g| {
                    if sigmoid {
                        descending(g).iter().take(2).map(|&i| g[i]).sum()
                    } else {
                        g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    }
                })
                .collect();
            let mut kept = vec![false; groups.max(1)];
            for g in descending(&group_scores).into_iter().take(topk_groups) {
                kept[g] = true;
            }
            // transformers fills the dropped groups with 0.0 (not -inf) before its top-k.
            let masked: Vec<f32> =
                choice.iter().enumerate().map(|(e, &s)| if kept[e / per_group] { s } else { 0.0 }).collect();
            let mut order = descending(&masked);
            order.truncate(top_k);
            let mut weights: Vec<f32> = order.iter().map(|&e| scores[e]).collect();
            if renormalize {
                let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            weights.iter_mut().for_each(|w| *w *= scaling);
            (indices(order), weights)
        }
    }
}

fn indices(order: Vec<usize>) -> Vec<u32> {
    order.into_iter().map(|e| e as u32).collect()
}

/// Indices of `values` in descending order; equal values keep the lower index first.
fn descending(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
}

/// Softmax in f32 with the max subtracted, as torch computes it.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The kernels, apart so that their `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// The score an expert is weighted by: its softmax probability (`top` and `sum` are the
    /// row's maximum and sum of exponentials), its sigmoid, or its logit (`TopKSoftmax`).
    #[cube]
    fn score(x: f32, top: f32, sum: f32, #[comptime] rule: u32, #[comptime] sigmoid: bool) -> f32 {
        if comptime!(rule == 1) {
            x
        } else if comptime!(sigmoid) {
            f32::new(1.0) / (f32::new(1.0) + f32::exp(f32::new(0.0) - x))
        } else {
            f32::exp(x - top) / sum
        }
    }

    /// What group `g`'s experts are selected on: score plus bias.
    #[cube]
    #[allow(clippy::too_many_arguments)] // the row and the rule, passed through
    fn group_score(
        logits: &Tensor<f32>,
        bias: &Tensor<f32>,
        base: usize,
        g: usize,
        per_group: usize,
        top: f32,
        sum: f32,
        #[comptime] sigmoid: bool,
        #[comptime] has_bias: bool,
    ) -> f32 {
        let mut first = f32::min_value();
        let mut second = f32::min_value();
        for i in 0..per_group {
            let e = g * per_group + i;
            let mut c = score(logits[base + e], top, sum, 2u32, sigmoid);
            if has_bias {
                c += bias[e];
            }
            if c > first {
                second = first;
                first = c;
            } else if c > second {
                second = c;
            }
        }
        let mut total = first;
        if sigmoid && per_group > 1 {
            total = first + second;
        }
        total
    }

    /// Routes token `ABSOLUTE_POS`: `out[t] = [experts (as f32) | weights]`, `2 * top_k` wide.
    /// `rule`: 0 softmax then top-k, 1 top-k then softmax, 2 group-limited. With `tables`, it
    /// also writes the token's entries of a page's tables, as `tables_kernel` would from `out`
    /// (one launch instead of two when a layer's experts sit in one page).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and the rule's parameters
    pub(super) fn route_kernel(
        logits: &Tensor<f32>, // [tokens, stride]: the router's columns first
        bias: &Tensor<f32>,   // [experts] (when has_bias)
        out: &mut Tensor<f32>,
        slots: &Tensor<u32>, // [experts] (when tables)
        groups_out: &mut Tensor<u32>,
        assign: &mut Tensor<u32>,
        weights: &mut Tensor<f32>,
        stride: u32,
        experts: u32,
        top_k: u32,
        groups: u32,
        topk_groups: u32,
        scaling: f32,
        #[comptime] rule: u32,
        #[comptime] sigmoid: bool,
        #[comptime] renormalize: bool,
        #[comptime] has_bias: bool,
        #[comptime] tables: bool,
    ) {
        let t = ABSOLUTE_POS;
        let k = top_k as usize;
        if t * 2 * k >= out.len() {
            terminate!();
        }
        let n = experts as usize;
        let base = t * stride as usize;
        let o = t * 2 * k;
        // The softmax's maximum and sum, in index order.
        let mut top = f32::min_value();
        let mut sum = f32::new(0.0);
        if comptime!(rule != 1 && !sigmoid) {
            for e in 0..n {
                top = max(top, logits[base + e]);
            }
            for e in 0..n {
                sum += f32::exp(logits[base + e] - top);
            }
        }
        // Kept groups, one bit each: a group is kept when fewer than `topk_groups` groups come
        // before it (higher score, or equal with a lower index).
        let mut kept = 0u32;
        let per_group = n / max(groups as usize, 1);
        if comptime!(rule == 2) {
            for g in 0..groups as usize {
                let mine = group_score(logits, bias, base, g, per_group, top, sum, sigmoid, has_bias);
                let mut before = 0u32;
                for h in 0..groups as usize {
                    let theirs = group_score(logits, bias, base, h, per_group, top, sum, sigmoid, has_bias);
                    if theirs > mine || (theirs == mine && h < g) {
                        before += 1;
                    }
                }
                if before < topk_groups {
                    kept |= 1u32 << g as u32;
                }
            }
        }
        // Top-k by selection: rank r takes the best key after rank r - 1's in the order
        // (key descending, index ascending).
        let mut last_key = f32::new(0.0);
        let mut last = 0usize;
        for r in 0..k {
            let mut found = false;
            let mut best_key = f32::new(0.0);
            let mut best = 0usize;
            for e in 0..n {
                let x = logits[base + e];
                let mut key = score(x, top, sum, rule, sigmoid);
                if comptime!(rule == 2) {
                    if has_bias {
                        key += bias[e];
                    }
                    if (kept >> (e / per_group) as u32) & 1u32 == 0u32 {
                        key = f32::new(0.0);
                    }
                }
                let after = r == 0 || key < last_key || (key == last_key && e > last);
                if after && (!found || key > best_key) {
                    found = true;
                    best_key = key;
                    best = e;
                }
            }
            out[o + r] = f32::cast_from(best as u32);
            out[o + k + r] = score(logits[base + best], top, sum, rule, sigmoid);
            last_key = best_key;
            last = best;
        }
        // Weights: softmax over the chosen logits, or the scores renormalised and scaled.
        if comptime!(rule == 1) {
            let first = out[o + k];
            let mut total = f32::new(0.0);
            for r in 0..k {
                let e = f32::exp(out[o + k + r] - first);
                out[o + k + r] = e;
                total += e;
            }
            for r in 0..k {
                out[o + k + r] /= total;
            }
        } else {
            if renormalize {
                let mut total = f32::new(0.0);
                for r in 0..k {
                    total += out[o + k + r];
                }
                if comptime!(rule == 2) {
                    total += f32::new(1e-20);
                }
                for r in 0..k {
                    out[o + k + r] /= total;
                }
            }
            if comptime!(rule == 2) {
                for r in 0..k {
                    out[o + k + r] *= scaling;
                }
            }
        }
        if comptime!(tables) {
            for r in 0..k {
                let expert = u32::cast_from(out[o + r]);
                table_entry(slots, groups_out, assign, weights, t * k + r, t, expert, out[o + k + r]);
            }
        }
    }

    /// The tables' entries of assignment `a` (of token `t`) routed to expert `e` with `weight`:
    /// a group of one row at the expert's slot when it sits in this page (`slots[e]`,
    /// `u32::MAX` elsewhere), else an empty group.
    #[cube]
    #[allow(clippy::too_many_arguments)] // the tables and one assignment
    fn table_entry(
        slots: &Tensor<u32>,
        groups: &mut Tensor<u32>,
        assign: &mut Tensor<u32>,
        weights: &mut Tensor<f32>,
        a: usize,
        t: usize,
        expert: u32,
        weight: f32,
    ) {
        let mut e = expert;
        if e as usize >= slots.len() {
            e = 0u32;
        }
        let slot = slots[e as usize];
        let here = slot != 0xFFFF_FFFFu32;
        groups[a * 4] = select(here, slot, 0u32);
        groups[a * 4 + 1] = a as u32;
        groups[a * 4 + 2] = select(here, a as u32 + 1u32, a as u32);
        groups[a * 4 + 3] = e;
        assign[a * 2] = t as u32;
        assign[a * 2 + 1] = a as u32;
        weights[a] = weight;
    }

    /// One group per assignment `a = token * top_k + rank`: the slot of its expert when the
    /// expert sits in this page (`slots[e]`, `u32::MAX` elsewhere), else an empty group.
    #[cube(launch)]
    pub(super) fn tables_kernel(
        route: &Tensor<f32>, // [tokens, 2 * top_k]
        slots: &Tensor<u32>, // [experts]
        groups: &mut Tensor<u32>,
        assign: &mut Tensor<u32>,
        weights: &mut Tensor<f32>,
        top_k: u32,
    ) {
        let a = ABSOLUTE_POS;
        if a >= weights.len() {
            terminate!();
        }
        let k = top_k as usize;
        let (t, r) = (a / k, a % k);
        let expert = u32::cast_from(route[t * 2 * k + r]);
        table_entry(slots, groups, assign, weights, a, t, expert, route[t * 2 * k + k + r]);
    }
}

/// A layer's router logits and what routes them: `route`'s arguments, for callers that pick
/// between `route` and `route_with_tables` later.
pub struct Router<'a> {
    pub logits: Tensor<2>,
    pub bias: Option<&'a CubeTensor>,
    pub experts: usize,
    pub top_k: usize,
    pub rule: Rule,
}

impl Router<'_> {
    pub fn route(self) -> Result<Tensor<2>, ShaderError> {
        route(self.logits, self.bias, self.experts, self.top_k, self.rule)
    }

    pub fn route_with_tables(self, slots: &CubeTensor) -> Result<(Tensor<2>, DeviceWork), ShaderError> {
        route_with_tables(self.logits, self.bias, self.experts, self.top_k, self.rule, slots)
    }
}

/// Routes every row of `logits` `[tokens, columns]` (the router's `experts` columns first) by
/// `rule`; `bias` is the selection bias of routers that have one. Returns `[tokens, 2 * top_k]`:
/// each token's experts (as f32, exact below 2^24) then their weights.
pub fn route(
    logits: Tensor<2>,
    bias: Option<&CubeTensor>,
    experts: usize,
    top_k: usize,
    rule: Rule,
) -> Result<Tensor<2>, ShaderError> {
    launch(logits, bias, experts, top_k, rule, None).map(|(route, _)| route)
}

/// `route` and `tables` in one launch, for a layer whose experts all sit in the page `slots`
/// describes (each unit writes its token's route, then the token's table entries from it).
pub fn route_with_tables(
    logits: Tensor<2>,
    bias: Option<&CubeTensor>,
    experts: usize,
    top_k: usize,
    rule: Rule,
    slots: &CubeTensor,
) -> Result<(Tensor<2>, DeviceWork), ShaderError> {
    let (route, work) = launch(logits, bias, experts, top_k, rule, Some(slots))?;
    let work = work.ok_or_else(|| ShaderError::Shape("routing with tables made no tables".into()))?;
    Ok((route, work))
}

/// The routing launch, writing a page's tables too where `slots` is given.
fn launch(
    logits: Tensor<2>,
    bias: Option<&CubeTensor>,
    experts: usize,
    top_k: usize,
    rule: Rule,
    slots: Option<&CubeTensor>,
) -> Result<(Tensor<2>, Option<DeviceWork>), ShaderError> {
    let [tokens, columns] = logits.dims();
    let slots_ok = slots.is_none_or(|s| s.meta.shape().num_elements() == experts);
    if experts > columns || top_k > experts || top_k == 0 || !rule.on_device() || !slots_ok {
        return Err(ShaderError::Shape(format!(
            "routing top-{top_k} of {experts} experts over {columns} columns by {rule:?} on the device{}",
            if slots_ok { "" } else { " with a page's slots of another width" }
        )));
    }
    let lc = burn_cubecl::kernel::into_contiguous(cube_float(logits)?);
    let client = lc.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype(
        client.clone(),
        lc.device.clone(),
        [tokens, 2 * top_k].into(),
        DType::F32,
    );
    let (code, sigmoid, renormalize, groups, topk_groups, scaling) = match rule {
        Rule::SoftmaxTopK { renormalize } => (0, false, renormalize, 1, 1, 1.0),
        Rule::TopKSoftmax => (1, false, false, 1, 1, 1.0),
        Rule::Grouped { sigmoid, groups, topk_groups, renormalize, scaling } => {
            (2, sigmoid, renormalize, groups, topk_groups, scaling)
        }
    };
    let bias_arg = bias.cloned().unwrap_or_else(|| lc.clone());
    // Without tables the table arguments are placeholders the kernel never touches.
    let work = slots.map(|_| new_work(&out, tokens * top_k));
    let placeholder =
        |dtype| burn_cubecl::ops::numeric::empty_device_dtype(client.clone(), lc.device.clone(), [1].into(), dtype);
    let (slots_arg, groups_arg, assign_arg, weights_arg) = match (slots, &work) {
        (Some(slots), Some(w)) => (slots.clone(), w.groups.clone(), w.assign.clone(), w.weights.clone()),
        _ => (placeholder(DType::U32), placeholder(DType::U32), placeholder(DType::U32), placeholder(DType::F32)),
    };
    let (count, dim) = crate::launches::elementwise(&client, tokens);
    kernel::route_kernel::launch(
        &client,
        count,
        dim,
        lc.into_tensor_arg(),
        bias_arg.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        slots_arg.into_tensor_arg(),
        groups_arg.into_tensor_arg(),
        assign_arg.into_tensor_arg(),
        weights_arg.into_tensor_arg(),
        columns as u32,
        experts as u32,
        top_k as u32,
        groups as u32,
        topk_groups as u32,
        scaling,
        code,
        sigmoid,
        renormalize,
        bias.is_some(),
        slots.is_some(),
    );
    Ok((from_cube(out), work))
}

/// Empty tables for `n` (token, rank) assignments, on `like`'s device.
fn new_work(like: &CubeTensor, n: usize) -> DeviceWork {
    let make = |len: usize, dtype: DType| {
        burn_cubecl::ops::numeric::empty_device_dtype(
            like.client.clone(),
            like.device.clone(),
            [len.max(1)].into(),
            dtype,
        )
    };
    DeviceWork {
        groups: make(n * 4, DType::U32),
        assign: make(n * 2, DType::U32),
        weights: make(n, DType::F32),
        n_groups: n,
    }
}

/// A page's slots per expert (`u32::MAX` where the expert is in another page) on the device, for
/// `tables` and `route_with_tables`.
pub fn page_slots(like: &CubeTensor, slots: &[u32]) -> CubeTensor {
    let handle = like.client.create_from_slice(bytemuck::cast_slice(slots));
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), [slots.len()].into(), handle, DType::U32)
}

/// A page's tables for the grouped expert kernel from routes on the device (`route`'s output):
/// one group per (token, rank), empty where the expert sits in another page. `slots` is
/// `page_slots`'s: expert `e`'s slot in this page, `u32::MAX` where it is not in it.
pub fn tables(route: &CubeTensor, slots: &CubeTensor, top_k: usize) -> DeviceWork {
    let tokens = route.meta.shape()[0];
    let n = tokens * top_k;
    let client = route.client.clone();
    let work = new_work(route, n);
    let (count, dim) = crate::launches::elementwise(&client, n);
    kernel::tables_kernel::launch(
        &client,
        count,
        dim,
        route.clone().into_tensor_arg(),
        slots.clone().into_tensor_arg(),
        work.groups.clone().into_tensor_arg(),
        work.assign.clone().into_tensor_arg(),
        work.weights.clone().into_tensor_arg(),
        top_k as u32,
    );
    work
}

/// `route`'s output read back: per token, its experts and weights.
pub fn parse(values: &[f32], top_k: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
    values
        .chunks_exact(2 * top_k)
        .map(|r| (r[..top_k].iter().map(|&e| e as u32).collect(), r[top_k..].to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::{Rule, page_slots, parse, reference, route, route_with_tables, tables};
    use crate::bridge::cube_float;
    use crate::testing::{device, random};

    fn check(rule: Rule, experts: usize, top_k: usize, columns: usize, bias: bool) {
        let device = &device();
        let tokens = 9;
        let mut logits = random(tokens * columns, 7, 3.0);
        // Ties: equal logits must resolve to the lower index, as the reference does.
        logits[3] = logits[5];
        logits[columns + 1] = logits[columns + 2];
        logits[2 * columns..2 * columns + experts].iter_mut().for_each(|v| *v = 0.5);
        let bias_values = random(experts, 8, 0.5);
        let bias_tensor = bias.then(|| {
            cube_float(Tensor::<1>::from_data(TensorData::new(bias_values.clone(), [experts]), device)).unwrap()
        });
        let t = Tensor::<2>::from_data(TensorData::new(logits.clone(), [tokens, columns]), device);
        let got = route(t, bias_tensor.as_ref(), experts, top_k, rule).unwrap();
        let got = parse(&got.into_data().try_to_vec::<f32>().unwrap(), top_k);
        for (t, (experts_got, weights_got)) in got.iter().enumerate() {
            let row = &logits[t * columns..t * columns + experts];
            let (want_e, want_w) = reference(row, bias.then_some(&bias_values[..]), top_k, rule);
            assert_eq!(experts_got, &want_e, "{rule:?} token {t}");
            for (g, w) in weights_got.iter().zip(&want_w) {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{rule:?} token {t}: {g} against {w}");
            }
        }
    }

    /// Every family's rule, ties included, with the router's columns followed by others (the
    /// pre-gate's): the kernel picks the reference's experts in its order, and its weights.
    #[test]
    fn device_routing_matches_the_host_reference() {
        check(Rule::SoftmaxTopK { renormalize: true }, 16, 4, 16, false);
        check(Rule::SoftmaxTopK { renormalize: false }, 16, 2, 24, false);
        check(Rule::TopKSoftmax, 8, 3, 8, false);
        let v2 = Rule::Grouped { sigmoid: false, groups: 4, topk_groups: 2, renormalize: false, scaling: 2.5 };
        check(v2, 16, 3, 16, false);
        let v3 = Rule::Grouped { sigmoid: true, groups: 4, topk_groups: 2, renormalize: true, scaling: 2.5 };
        check(v3, 32, 4, 40, true);
        let greedy = Rule::Grouped { sigmoid: false, groups: 1, topk_groups: 1, renormalize: false, scaling: 1.0 };
        check(greedy, 8, 2, 8, false);
        // Experts of one per group: the group's score is its only expert's.
        let singles = Rule::Grouped { sigmoid: true, groups: 8, topk_groups: 3, renormalize: true, scaling: 1.0 };
        check(singles, 8, 2, 8, true);
    }

    /// Dropped groups count as 0 on the device too: a negative biased score in a kept group
    /// loses to an expert of a dropped group.
    #[test]
    fn device_routing_scores_dropped_groups_zero() {
        let device = &device();
        let rule = Rule::Grouped { sigmoid: true, groups: 2, topk_groups: 1, renormalize: false, scaling: 1.0 };
        let bias =
            cube_float(Tensor::<1>::from_data(TensorData::new(vec![-0.4f32, -0.9, -2.0, -2.0], [4]), device)).unwrap();
        let t = Tensor::<2>::from_data(TensorData::new(vec![0.0f32; 4], [1, 4]), device);
        let got = route(t, Some(&bias), 4, 2, rule).unwrap();
        let got = parse(&got.into_data().try_to_vec::<f32>().unwrap(), 2);
        assert_eq!(got[0].0, vec![0, 2]);
        assert!(route(Tensor::<2>::zeros([1, 4], device), None, 8, 2, rule).is_err(), "more experts than columns");
    }

    /// One launch that routes and builds a page's tables gives the two launches' results bit
    /// for bit, with some experts outside the page (their groups empty).
    #[test]
    fn routing_with_tables_in_one_launch_equals_two_launches() {
        let device = &device();
        let (tokens, experts, top_k) = (5, 8, 3);
        let logits = random(tokens * experts, 11, 2.0);
        let input = || Tensor::<2>::from_data(TensorData::new(logits.clone(), [tokens, experts]), device);
        let slot_values: Vec<u32> = (0..experts as u32).map(|e| if e % 3 == 1 { u32::MAX } else { 7 - e }).collect();
        let rule = Rule::SoftmaxTopK { renormalize: true };
        let two = cube_float(route(input(), None, experts, top_k, rule).unwrap()).unwrap();
        let slots = page_slots(&two, &slot_values);
        let work = tables(&two, &slots, top_k);
        let (one, fused) = route_with_tables(input(), None, experts, top_k, rule, &slots).unwrap();
        // The tables' raw words: u32 and f32 alike compare bit for bit.
        let read = |t: &burn_cubecl::tensor::CubeTensor| -> Vec<u32> {
            bytemuck::pod_collect_to_vec(&t.client.read_one(t.handle.clone()).unwrap()[..])
        };
        assert_eq!(
            one.into_data().try_to_vec::<f32>().unwrap(),
            crate::from_cube::<2>(two).into_data().try_to_vec::<f32>().unwrap()
        );
        assert_eq!(read(&fused.groups), read(&work.groups));
        assert_eq!(read(&fused.assign), read(&work.assign));
        assert_eq!(read(&fused.weights), read(&work.weights));
        assert_eq!(fused.n_groups, tokens * top_k);
        // Some group is empty (an expert outside the page), some is not.
        let groups = read(&fused.groups);
        assert!(groups.chunks_exact(4).any(|g| g[1] == g[2]) && groups.chunks_exact(4).any(|g| g[1] != g[2]));
        let wrong = page_slots(&fused.groups, &slot_values[..4]);
        assert!(route_with_tables(input(), None, experts, top_k, rule, &wrong).is_err(), "slots of another width");
    }
}
