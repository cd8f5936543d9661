//! The mixture-of-experts block: router on the GPU, routing decision on the host, then the
//! grouped expert kernel runs every chosen expert over the tokens routed to it, reading the
//! experts from their slots in the expert cache.

use std::collections::{BTreeMap, HashSet};

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};
use burn_cubecl::tensor::CubeTensor;

use super::ffn::SwiGlu;
use super::linear::{Linear, Loader};
use crate::error::{FerryError, Result};
use crate::experts::{ExpertCache, ExpertExtras, PageWork, SlotRef, cube_float, from_cube};
use crate::routing::{TokenRoute, route};
use crate::spec::{ModelSpec, RouterKind};

struct SharedExpert {
    mlp: SwiGlu,
    gate: Option<Linear>,
}

/// Predicts a later MoE layer's experts from this layer's router input.
#[derive(Clone)]
pub struct PreGate {
    /// The MoE layer predicted (the next one).
    pub target: usize,
    /// That layer's router (plug-and-play), or a trained pre-gate from the checkpoint.
    pub router: Linear,
    pub trained: bool,
    /// The target layer's selection bias (DeepSeek-V3), so that the prediction follows its
    /// routing rule.
    pub score_bias: Option<Vec<f32>>,
}

/// Router and shared expert of one layer; the routed experts live in the `ExpertCache`.
pub struct MoeBlock {
    layer: usize,
    router: Linear,
    /// Per-expert selection bias (DeepSeek-V3's `e_score_correction_bias`).
    score_bias: Option<Vec<f32>>,
    pregate: Option<PreGate>,
    /// The router and the pre-gate as one projection (`[own | predicted]` columns), so that a
    /// pass with prefetching runs one launch for both; set with the pre-gate.
    router_and_pregate: Option<Linear>,
    shared: Option<SharedExpert>,
    /// Routed experts' biases and activation, for the kernels.
    extras: ExpertExtras,
    num_experts: usize,
    top_k: usize,
    kind: RouterKind,
}

/// What one expert serves: (token row in the batch, output row, routing weight). The output
/// row is `token * top_k + rank`, so each (token, expert) pair has a row of its own.
type Served = Vec<(usize, usize, f32)>;

impl MoeBlock {
    pub fn load(loader: &Loader, spec: &ModelSpec, layer: usize) -> Result<Self> {
        let names = &spec.names;
        let h = spec.hidden_size;
        let moe = &spec.moe;
        let router_name = names.layer(layer, &names.router);
        let router_prefix = router_name.trim_end_matches(".weight");
        let router = loader.linear(router_prefix, h, moe.num_experts, moe.router_bias)?;
        let score_bias = if moe.router.has_score_bias() {
            Some(loader.store.f32(&format!("{router_prefix}.e_score_correction_bias"), &[moe.num_experts])?)
        } else {
            None
        };
        let shared = match &moe.shared_expert {
            None => None,
            Some(s) => {
                let base = names.layer(layer, &names.shared_expert);
                let p = &names.expert_projections;
                let prefixes = [format!("{base}.{}", p[0]), format!("{base}.{}", p[1]), format!("{base}.{}", p[2])];
                let mlp = SwiGlu::load(loader, [&prefixes[0], &prefixes[1], &prefixes[2]], h, s.intermediate_size)?;
                let gate = if s.sigmoid_gate {
                    let name = names.layer(layer, &names.shared_expert_gate);
                    Some(loader.linear(name.trim_end_matches(".weight"), h, 1, false)?)
                } else {
                    None
                };
                Some(SharedExpert { mlp, gate })
            }
        };
        let bias = if moe.expert_bias { Some(expert_biases(loader, spec, layer)?) } else { None };
        let extras = ExpertExtras::new(bias, moe.activation, loader.device)?;
        Ok(Self {
            layer,
            router,
            score_bias,
            extras,
            pregate: None,
            router_and_pregate: None,
            shared,
            num_experts: moe.num_experts,
            top_k: moe.top_k,
            kind: moe.router,
        })
    }

    pub fn router(&self) -> &Linear {
        &self.router
    }

    pub fn score_bias(&self) -> Option<&[f32]> {
        self.score_bias.as_deref()
    }

    pub fn set_pregate(&mut self, pregate: PreGate) {
        self.router_and_pregate = Some(Linear::concat(&[&self.router, &pregate.router]));
        self.pregate = Some(pregate);
    }

    pub fn pregate(&self) -> Option<&PreGate> {
        self.pregate.as_ref()
    }

    /// `x` `[tokens, hidden]` (already normed). Returns the block output, as `parts` rows per
    /// token to be summed in order (`[tokens * parts, hidden]`: the weighted expert output of each
    /// rank, or one row when a shared expert is added here), and each token's route.
    ///
    /// Experts already resident run first, then the misses (each uploaded once, even when the
    /// cache has fewer slots than this layer needs); their outputs are summed in expert order
    /// whatever the residency, so offloaded output equals all-resident output bit for bit.
    ///
    /// With `prefetch_k`, the pre-gate's top-`prefetch_k` experts for the next MoE layer are
    /// requested before this layer's experts run, so their staging overlaps this layer's compute;
    /// under big-little, a token expected to be little there gets only its first half staged.
    /// `received` `[tokens, 1]` is the attention each token received in this layer (computed
    /// only for `--importance attention`).
    pub fn forward(
        &self,
        x: Tensor<2>,
        experts: &mut ExpertCache,
        prefetch_k: Option<usize>,
        received: Option<Tensor<2>>,
        device: &Device,
    ) -> Result<(Tensor<2>, usize, Vec<TokenRoute>)> {
        let [tokens, hidden] = x.dims();
        let pregate = self.pregate.as_ref().filter(|_| prefetch_k.is_some());
        // One read-back serves the routing, the prediction and the received attention:
        // columns [own router | pre-gate | received].
        let scores = match (pregate, &self.router_and_pregate) {
            (Some(_), Some(both)) => both.forward(x.clone()),
            _ => self.router.forward(x.clone()),
        };
        let has_received = received.is_some();
        let columns = match received {
            Some(r) => Tensor::cat(vec![scores, r], 1),
            None => scores,
        };
        let logits: Vec<f32> =
            columns.into_data().try_into_vec().map_err(|e| FerryError::Gpu(format!("reading router logits: {e:?}")))?;
        let width = logits.len() / tokens;
        let targets = width - self.num_experts - usize::from(has_received);
        let own: Vec<f32> = logits.chunks_exact(width).flat_map(|row| &row[..self.num_experts]).copied().collect();
        let received: Option<Vec<f32>> =
            has_received.then(|| logits.chunks_exact(width).map(|row| row[width - 1]).collect());
        let mut routes = route(&own, self.score_bias.as_deref(), self.num_experts, self.top_k, self.kind);
        experts.select_big_little(self.layer, &mut routes, &own, self.num_experts, received.as_deref())?;

        let k = self.top_k;
        let mut served: Vec<Served> = vec![Vec::new(); self.num_experts];
        for (t, r) in routes.iter().enumerate() {
            for (rank, (&e, &w)) in r.experts.iter().zip(&r.weights).enumerate() {
                served[e as usize].push((t, t * k + rank, w));
            }
        }
        let needed: Vec<usize> = (0..self.num_experts).filter(|&e| !served[e].is_empty()).collect();
        if let (Some(p), Some(predict_k)) = (pregate, prefetch_k) {
            let predicted: Vec<f32> = logits
                .chunks_exact(width)
                .flat_map(|row| &row[self.num_experts..self.num_experts + targets])
                .copied()
                .collect();
            let per_token = self.staged_per_token(experts, p, &predicted, targets, predict_k, received.as_deref());
            let mut unique: Vec<usize> = per_token.iter().flatten().map(|&e| e as usize).collect();
            unique.sort_unstable();
            unique.dedup();
            let protect: Vec<(usize, usize)> = needed.iter().map(|&e| (self.layer, e)).collect();
            experts.prefetch(p.target, &unique, &protect);
            experts.record_prediction(p.target, per_token);
        }
        let (hits, misses): (Vec<usize>, Vec<usize>) =
            needed.iter().partition(|&&e| experts.is_resident(self.layer, e));

        // A little token's unused ranks must add nothing when the rows are summed per token, so
        // their rows start at zero; when every token takes all k experts, each row is written.
        let inter = experts.dims().0;
        let xc = cube_float(x.clone())?;
        let act = cube_float(Tensor::<2>::empty([tokens * k, inter], device))?;
        let rows = [tokens * k, hidden];
        let every_rank = routes.iter().all(|r| r.experts.len() == k);
        let y =
            cube_float(if every_rank { Tensor::<2>::empty(rows, device) } else { Tensor::<2>::zeros(rows, device) })?;
        // Experts are fetched into a batch until the cache cannot make room without evicting one
        // of the batch; then the batch's kernels are queued and its slots become evictable.
        let mut batch: Vec<(usize, SlotRef)> = Vec::new();
        let mut keep: HashSet<(usize, usize)> = HashSet::new();
        for e in hits.into_iter().chain(misses) {
            let at = match experts.fetch_keeping(self.layer, e, &keep)? {
                Some(at) => at,
                None => {
                    self.launch(experts, &batch, &served, &xc, &act, &y, device)?;
                    batch.clear();
                    keep.clear();
                    experts.fetch(self.layer, e)?
                }
            };
            keep.insert((self.layer, e));
            batch.push((e, at));
        }
        self.launch(experts, &batch, &served, &xc, &act, &y, device)?;
        let chosen: Vec<Vec<u32>> = routes.iter().map(|r| r.experts.clone()).collect();
        experts.score_prediction(self.layer, &chosen);
        let rows = from_cube::<2>(y);
        let Some(shared) = &self.shared else { return Ok((rows, k, routes)) };
        let mut y = shared.mlp.forward(x.clone());
        if let Some(gate) = &shared.gate {
            y = y * sigmoid(gate.forward(x));
        }
        let out = rows.reshape([tokens, k, hidden]).sum_dim(1).reshape([tokens, hidden]) + y;
        Ok((out, 1, routes))
    }

    /// The experts to stage for each token of the pre-gate's target layer: its predicted
    /// top-`predict_k`, or, when big-little expects the token to be little there, the first
    /// top-k/2 of them (plus the same `--prefetch-extra` margin).
    fn staged_per_token(
        &self,
        experts: &mut ExpertCache,
        pregate: &PreGate,
        predicted: &[f32],
        targets: usize,
        predict_k: usize,
        received: Option<&[f32]>,
    ) -> Vec<Vec<u32>> {
        // The target's routing rule (all MoE layers of a model share the router kind).
        let target = pregate.target;
        let routes = route(predicted, pregate.score_bias.as_deref(), targets, predict_k.min(targets), self.kind);
        let top_k: Vec<TokenRoute> = routes
            .iter()
            .map(|r| {
                let k = self.top_k.min(r.experts.len());
                TokenRoute { experts: r.experts[..k].to_vec(), weights: r.weights[..k].to_vec() }
            })
            .collect();
        let expected = experts.expect_big(target, predicted, targets, &top_k, received);
        let little = self.top_k.div_ceil(2) + predict_k.saturating_sub(self.top_k);
        routes
            .into_iter()
            .enumerate()
            .map(|(t, r)| {
                let mut staged = r.experts;
                if expected.as_ref().is_some_and(|big| !big[t]) {
                    staged.truncate(little);
                }
                staged
            })
            .collect()
    }

    /// Queues the grouped expert kernel for a batch of fetched experts, one launch pair per
    /// slot page the batch touches.
    #[allow(clippy::too_many_arguments)] // the kernel's buffers, passed through as they are
    fn launch(
        &self,
        experts: &ExpertCache,
        batch: &[(usize, SlotRef)],
        served: &[Served],
        x: &CubeTensor,
        act: &CubeTensor,
        y: &CubeTensor,
        device: &Device,
    ) -> Result<()> {
        let mut pages: BTreeMap<usize, PageWork> = BTreeMap::new();
        for &(e, at) in batch {
            pages.entry(at.page).or_default().push(at.slot, e, served[e].iter().copied());
        }
        for (page, work) in pages {
            experts.page(page)?.swiglu(x, &work, &self.extras, act, y, device)?;
        }
        Ok(())
    }
}

/// A fused layer's expert biases for the kernels: gate then up `[experts, 2 * inter]` (the
/// checkpoint interleaves them, gate in the even entries) and down `[experts, hidden]`.
fn expert_biases(loader: &Loader, spec: &ModelSpec, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (e, h, i) = (spec.moe.num_experts, spec.hidden_size, spec.moe.expert_intermediate_size);
    let prefix = spec.names.layer(layer, &spec.names.fused_experts);
    let interleaved = loader.store.f32(&format!("{prefix}.gate_up_proj_bias"), &[e, 2 * i])?;
    let gate_up = interleaved
        .chunks_exact(2 * i)
        .flat_map(|row| (0..i).map(|r| row[2 * r]).chain((0..i).map(|r| row[2 * r + 1])).collect::<Vec<_>>())
        .collect();
    let down = loader.store.f32(&format!("{prefix}.down_proj_bias"), &[e, h])?;
    Ok((gate_up, down))
}
