//! A MoE layer's expert work behind one call: the MoE block hands over its tokens and their
//! routes, and the expert manager applies big-little, starts the pre-gate's prefetch, brings
//! the experts into slots (hits first, then misses, in batches the cache can hold) and queues
//! the grouped kernels per slot page.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use ferry_shaders::expert::{ExpertExtras, PageWork, Work};
use ferry_shaders::route::Router;
use ferry_shaders::{cube_float, from_cube};
use rayon::prelude::*;

use super::cache::ExpertCache;
use super::host::{LayerExtras, swiglu};
use super::hybrid::{Decision, Miss, TOKENS_PER_PASS};
use super::residency::Access;
use super::slots::SlotRef;
use super::trace::{LayerTrace, PredictedTrace};
use crate::error::{FerryError, Result};
use crate::routing::TokenRoute;

/// One MoE layer's tokens and routing, handed to `ExpertCache::run_layer`.
pub struct LayerRequest<'a> {
    pub layer: usize,
    /// The normed tokens `[tokens, hidden]`.
    pub x: Tensor<2>,
    /// The router's choice per token, in rank order.
    pub routes: Vec<TokenRoute>,
    /// The router's logits `[tokens, experts]`, row-major (big-little scores them).
    pub logits: &'a [f32],
    /// The attention each token received in this layer (`--importance attention` only).
    pub received: Option<&'a [f32]>,
    pub top_k: usize,
    /// Routed experts' biases and activation.
    pub extras: &'a ExpertExtras,
    /// The same on the host, for experts computed there.
    pub host_extras: &'a LayerExtras,
    /// The normed tokens on the host `[tokens, hidden]`, when `wants_host_tokens` asked for them.
    pub x_host: Option<&'a [f32]>,
    /// The pre-gate's guess for a later layer, when prefetching.
    pub prediction: Option<Prediction<'a>>,
}

/// A pre-gate's guess for the next MoE layer: its router logits and routes per token.
pub struct Prediction<'a> {
    /// The MoE layer predicted.
    pub target: usize,
    /// Predicted router logits `[tokens, experts]` of the target layer.
    pub logits: &'a [f32],
    /// Per token, the predicted top-`predict_k` experts in rank order.
    pub routes: Vec<TokenRoute>,
    /// Experts predicted per token (the target's top-k plus `--prefetch-extra`).
    pub predict_k: usize,
    /// The target layer's top-k.
    pub top_k: usize,
    /// Whether to fetch the prediction (else it is only scored and traced).
    pub fetch: bool,
}

/// What a layer's experts produced.
pub struct LayerOutput {
    /// `[tokens * top_k, hidden]`: row `token * top_k + rank` holds that rank's weighted expert
    /// output (zero for the ranks a little token does not use).
    pub rows: Tensor<2>,
    /// The routes used (after big-little).
    pub routes: Vec<TokenRoute>,
}

/// What one expert serves: (token row in the batch, output row, routing weight). The output
/// row is `token * top_k + rank`, so each (token, expert) pair has a row of its own.
type Served = Vec<(usize, usize, f32)>;

impl ExpertCache {
    /// Runs every routed expert of one layer over the tokens routed to it.
    ///
    /// Experts already resident run first, then the misses (each uploaded once, even when the
    /// cache has fewer slots than this layer needs); every (token, expert) pair writes its own
    /// row whatever the residency, so offloaded output equals all-resident output bit for bit.
    /// A prediction's experts are requested before this layer's run, so their staging overlaps
    /// its compute; under big-little, a token expected to be little there gets only its first
    /// half staged.
    pub fn run_layer(&mut self, request: LayerRequest<'_>, device: &Device) -> Result<LayerOutput> {
        let LayerRequest { layer, x, mut routes, logits, received, top_k: k, extras, host_extras, x_host, prediction } =
            request;
        let [tokens, hidden] = x.dims();
        let num_experts = logits.len() / tokens.max(1);
        self.layer = layer;
        self.select_big_little(layer, &mut routes, logits, num_experts, received)?;

        let mut served: Vec<Served> = vec![Vec::new(); num_experts];
        for (t, r) in routes.iter().enumerate() {
            for (rank, (&e, &w)) in r.experts.iter().zip(&r.weights).enumerate() {
                served[e as usize].push((t, t * k + rank, w));
            }
        }
        let needed: Vec<usize> = (0..num_experts).filter(|&e| !served[e].is_empty()).collect();
        let mut predicted = None;
        if let Some(prediction) = prediction {
            let (target, fetch) = (prediction.target, prediction.fetch);
            let per_token = self.staged_per_token(prediction, received);
            if fetch {
                let mut unique: Vec<usize> = per_token.iter().flatten().map(|&e| e as usize).collect();
                unique.sort_unstable();
                unique.dedup();
                let protect: Vec<(usize, usize)> = needed.iter().map(|&e| (layer, e)).collect();
                self.prefetch(target, &unique, &protect);
            }
            if self.tracing() {
                predicted = Some(PredictedTrace { target, experts: per_token.clone() });
            }
            self.record_prediction(target, per_token);
        }
        let (hits, misses): (Vec<usize>, Vec<usize>) = needed.iter().partition(|&&e| self.is_resident(layer, e));
        // Misses the policy computes on the host; prefetched ones in flight are already paid for.
        let (mut on_host, mut uploads) = (Vec::new(), Vec::new());
        let used: HashSet<(usize, usize)> = hits.iter().map(|&e| (layer, e)).collect();
        for e in misses {
            let in_flight = self.in_flight.contains(&(layer, e));
            if !in_flight && self.decide_miss(layer, e, served[e].len(), k, uploads.len(), &used).on_host() {
                on_host.push(e);
            } else {
                uploads.push(e);
            }
        }
        let misses = uploads;
        if !on_host.is_empty() && x_host.is_none() {
            return Err(FerryError::Gpu(format!("layer {layer}: experts to compute on the host but no host tokens")));
        }

        // A little token's unused ranks must add nothing when the rows are summed per token, so
        // their rows start at zero; when every token takes all k experts, each row is written.
        let inter = self.dims().0;
        let xc = cube_float(x)?;
        let act = cube_float(Tensor::<2>::empty([tokens * k, inter], device))?;
        let shape = [tokens * k, hidden];
        let every_rank = routes.iter().all(|r| r.experts.len() == k);
        let y =
            cube_float(if every_rank { Tensor::<2>::empty(shape, device) } else { Tensor::<2>::zeros(shape, device) })?;
        let buffers = Buffers { x: &xc, act: &act, y: &y, extras, device };
        // Experts are fetched into a batch until the cache cannot make room without evicting one
        // of the batch; then the batch's kernels are queued and its slots become evictable.
        let mut batch: Vec<(usize, SlotRef)> = Vec::new();
        let mut keep: HashSet<(usize, usize)> = HashSet::new();
        for e in hits.into_iter().chain(misses) {
            let at = match self.fetch_keeping(layer, e, &keep)? {
                Some(at) => at,
                None => {
                    self.launch(&batch, &served, &buffers)?;
                    batch.clear();
                    keep.clear();
                    self.fetch(layer, e)?
                }
            };
            keep.insert((layer, e));
            batch.push((e, at));
        }
        self.launch(&batch, &served, &buffers)?;
        let mut rows = from_cube::<2>(y.clone());
        if let Some(x_host) = x_host.filter(|_| !on_host.is_empty()) {
            // The GPU computes the resident experts while the host computes the rest.
            y.client.flush().map_err(|e| FerryError::Gpu(format!("flushing the layer's expert kernels: {e:?}")))?;
            let (indices, values) = self.host_rows(layer, &on_host, &served, x_host, hidden, host_extras)?;
            let count = indices.len();
            let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [count]), device);
            let values = Tensor::<2>::from_data(TensorData::new(values, [count, hidden]), device);
            rows = rows.select_assign(0, indices, values, IndexingUpdateOp::Assign);
        }
        let chosen: Vec<Vec<u32>> = routes.iter().map(|r| r.experts.clone()).collect();
        self.score_prediction(layer, &chosen);
        if self.tracing() {
            self.record_trace(LayerTrace {
                pass: self.pass,
                layer,
                experts: chosen,
                weights: routes.iter().map(|r| r.weights.clone()).collect(),
                predicted,
                inputs: x_host.map(<[f32]>::to_vec),
                logits: Some(logits.to_vec()),
                block_inputs: None,
            });
        }
        Ok(LayerOutput { rows, routes })
    }

    /// Whether a MoE layer's experts can run from routes that stay on the device: every expert
    /// of every MoE layer is resident (so nothing is fetched or evicted, and the bookkeeping can
    /// wait for the end of the pass), nothing reads routes or logits on the host meanwhile
    /// (big-little, tracing, host-computed misses), and the layer's experts sit in at most
    /// `top_k` slot pages: routes on the device launch the kernels once per page holding any of
    /// the layer's experts, routes on the host once per page the token needs, at most `top_k`
    /// (a GPU binds a layer's experts in a page or two; lavapipe's 128 MiB binding spreads an
    /// OLMoE layer's f32 experts over 13, where the host's read costs less than the launches).
    pub fn routes_stay_on_device(&self, layer: usize, top_k: usize) -> bool {
        self.plan.all_resident()
            && self.slots.len() >= self.plan.total_experts
            && self.in_flight.is_empty()
            && self.selector.is_none()
            && !self.tracing()
            && !self.wants_host_tokens()
            && self.layer_pages(layer).len() <= top_k
    }

    /// Per slot page holding any of the layer's resident experts, each expert's slot in it
    /// (`u32::MAX` for the experts elsewhere).
    fn layer_pages(&self, layer: usize) -> BTreeMap<usize, Vec<u32>> {
        let num_experts = self.usage.get(layer).map_or(0, Vec::len);
        let mut pages: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for e in 0..num_experts {
            if let Some(slot) = self.slots.get(&(layer, e)) {
                let at = self.pool.locate(slot.index);
                pages.entry(at.page).or_insert_with(|| vec![u32::MAX; num_experts])[e] = at.slot as u32;
            }
        }
        pages
    }

    /// Routes one layer on the device and runs its experts over the routes (`[tokens, 2 * top_k]`,
    /// returned with the rows): one launch routes and builds the tables where the layer's experts
    /// sit in one slot page, else the routing kernel and then per page its tables; then the
    /// grouped kernels, as `run_layer` queues them. Rows as `run_layer`'s; the bookkeeping waits
    /// for `count_device_routes`. Only when `routes_stay_on_device`.
    pub fn run_layer_on_device(
        &mut self,
        layer: usize,
        x: Tensor<2>,
        router: Router<'_>,
        extras: &ExpertExtras,
        device: &Device,
    ) -> Result<(Tensor<2>, Tensor<2>)> {
        let [tokens, hidden] = x.dims();
        let top_k = router.top_k;
        let inter = self.dims().0;
        let num_experts = self.usage.get(layer).map_or(0, Vec::len);
        if (0..num_experts).any(|e| !self.is_resident(layer, e)) {
            return Err(FerryError::Gpu(format!("layer {layer}: routes on the device with experts not resident")));
        }
        let xc = cube_float(x)?;
        let act = cube_float(Tensor::<2>::empty([tokens * top_k, inter], device))?;
        // Every (token, rank) row is written by the page that holds its expert.
        let y = cube_float(Tensor::<2>::empty([tokens * top_k, hidden], device))?;
        let pages: Vec<(usize, CubeTensor)> = self
            .layer_pages(layer)
            .into_iter()
            .map(|(page, slots)| (page, self.device_slots(layer, page, slots, &xc)))
            .collect();
        let routes = if let [(page, slots)] = &pages[..] {
            let (routes, work) = router.route_with_tables(slots)?;
            self.page(*page)?.swiglu(&xc, Work::Device(&work), extras, &act, &y, device)?;
            routes
        } else {
            let routes = router.route()?;
            let rc = cube_float(routes.clone())?;
            for (page, slots) in &pages {
                let work = ferry_shaders::route::tables(&rc, slots, top_k);
                self.page(*page)?.swiglu(&xc, Work::Device(&work), extras, &act, &y, device)?;
            }
            routes
        };
        self.layer = layer;
        Ok((from_cube(y), routes))
    }

    /// A page's slots of `layer`'s experts on the device, uploaded again only when they change
    /// (while every expert stays resident they do not, so a decode step writes nothing).
    fn device_slots(&mut self, layer: usize, page: usize, slots: Vec<u32>, like: &CubeTensor) -> CubeTensor {
        match self.device_slots.get(&(layer, page)) {
            Some((held, tensor)) if *held == slots => tensor.clone(),
            _ => {
                let tensor = ferry_shaders::route::page_slots(like, &slots);
                self.device_slots.insert((layer, page), (slots, tensor.clone()));
                tensor
            }
        }
    }

    /// The bookkeeping `run_layer` does for hits, for a layer run by `run_layer_on_device` once
    /// its routes are back on the host: uses, the clock, the log and the hit count, per expert in
    /// index order as `run_layer` takes them.
    pub fn count_device_routes(&mut self, layer: usize, experts: &[Vec<u32>]) -> Result<()> {
        let mut needed: Vec<usize> = experts.iter().flatten().map(|&e| e as usize).collect();
        needed.sort_unstable();
        needed.dedup();
        self.layer = layer;
        for e in needed {
            self.fetch(layer, e)?;
        }
        Ok(())
    }

    /// Where a missed expert goes under `--miss-policy`, counted; `planned` uploads of this
    /// layer come before it, and the layer `used` its resident experts (which no upload evicts).
    fn decide_miss(
        &mut self,
        layer: usize,
        expert: usize,
        tokens: usize,
        k: usize,
        planned: usize,
        used: &HashSet<(usize, usize)>,
    ) -> Decision {
        let auto = self.hybrid.policy == crate::options::MissPolicy::Auto;
        let free = self.occupied() + planned < self.plan.slots;
        // The expert an upload would displace: the policy's victim now (the planned uploads'
        // victims are not picked yet, so it may be theirs too).
        let displaced_reuse = match (auto && !free).then(|| self.victim(used)).flatten() {
            Some((l, e)) => self.expected_reuse(l, e, k),
            None => 0.0,
        };
        let miss = Miss {
            tokens,
            bytes: self.plan.slot_bytes,
            reuse: self.expected_reuse(layer, expert, k),
            displaced_reuse,
            paid: self.host_excess[layer][expert],
            slots: self.plan.slots,
            free,
        };
        let decision = self.hybrid.decide(&miss);
        let paid = &mut self.host_excess[layer][expert];
        *paid = if decision.on_host() { *paid + self.hybrid.excess(tokens, miss.bytes) } else { 0.0 };
        match decision {
            Decision::Upload if auto => self.stats.auto_uploads += 1,
            Decision::UploadForReuse => self.stats.auto_uploads_for_reuse += 1,
            Decision::UploadPaidFor => self.stats.auto_uploads_paid_for += 1,
            Decision::Host if auto => self.stats.auto_host += 1,
            Decision::Probe { .. } => self.stats.auto_probes += 1,
            _ => {}
        }
        decision
    }

    /// Uses the expert is expected to see while it would stay resident: its uses per forward
    /// pass since the configuration changed (at most one), times the passes a slot survives,
    /// roughly the slots per MoE layer over the layer's top-k.
    fn expected_reuse(&self, layer: usize, expert: usize, k: usize) -> f64 {
        let since = self.usage[layer][expert] - self.usage_at_reconfigure[layer][expert];
        let per_pass = (since as f64 / self.passes.max(1) as f64).min(1.0);
        let layers = self.usage.iter().filter(|r| !r.is_empty()).count().max(1);
        per_pass * self.plan.slots as f64 / layers as f64 / k.max(1) as f64
    }

    /// Computes `experts` on the host for the tokens routed to them: the output row indices and
    /// their weighted rows `[rows, hidden]`, in the order of `experts`.
    fn host_rows(
        &mut self,
        layer: usize,
        experts: &[usize],
        served: &[Served],
        x: &[f32],
        hidden: usize,
        extras: &LayerExtras,
    ) -> Result<(Vec<i64>, Vec<f32>)> {
        let start = Instant::now();
        let (store, dtype, inter) = (&self.store, self.store.dtype(), self.dims().0);
        let outputs: Vec<(Vec<Vec<f32>>, u64)> = self.hybrid.install(|| {
            experts
                .par_iter()
                .map(|&e| {
                    let source = store.host_source(layer, e);
                    let xs: Vec<&[f32]> = served[e].iter().map(|&(t, _, _)| &x[t * hidden..][..hidden]).collect();
                    let weights: Vec<f32> = served[e].iter().map(|&(_, _, w)| w).collect();
                    let mut out = vec![Vec::new(); xs.len()];
                    swiglu(source.view(dtype), hidden, inter, &xs, &weights, extras.expert(e, inter, hidden), &mut out);
                    (out, source.bytes())
                })
                .collect()
        });
        let seconds = start.elapsed().as_secs_f64();
        let mut byte_passes = 0;
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        for (&e, (out, bytes)) in experts.iter().zip(outputs) {
            if out.iter().flatten().any(|v| !v.is_finite()) {
                // Name a non-finite weight as an upload would; rows that overflow from finite
                // weights are what the GPU would compute too.
                super::cache::finite_expert((layer, e), &self.store.host(layer, e))?;
            }
            byte_passes += bytes * served[e].len().div_ceil(TOKENS_PER_PASS) as u64;
            self.stats.host_bytes_read += bytes;
            self.stats.host_computed += 1;
            self.stats.misses += 1;
            self.clock += 1;
            self.usage[layer][e] += 1;
            self.log.record((layer, e), Access::Host, self.clock);
            for (&(_, row, _), r) in served[e].iter().zip(out) {
                indices.push(row as i64);
                values.extend(r);
            }
        }
        self.stats.host_seconds += seconds;
        self.hybrid.record_host(byte_passes, seconds);
        Ok((indices, values))
    }

    /// The experts to stage for each token of the prediction's target layer: its predicted
    /// top-`predict_k`, or, when big-little expects the token to be little there, the first
    /// top-k/2 of them (plus the same `--prefetch-extra` margin).
    fn staged_per_token(&mut self, prediction: Prediction<'_>, received: Option<&[f32]>) -> Vec<Vec<u32>> {
        let Prediction { target, logits, routes, predict_k, top_k, .. } = prediction;
        let tokens = routes.len().max(1);
        let targets = logits.len() / tokens;
        let top: Vec<TokenRoute> = routes
            .iter()
            .map(|r| {
                let k = top_k.min(r.experts.len());
                TokenRoute { experts: r.experts[..k].to_vec(), weights: r.weights[..k].to_vec() }
            })
            .collect();
        let expected = self.expect_big(target, logits, targets, &top, received);
        let little = top_k.div_ceil(2) + predict_k.saturating_sub(top_k);
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
    fn launch(&self, batch: &[(usize, SlotRef)], served: &[Served], b: &Buffers<'_>) -> Result<()> {
        let mut pages: BTreeMap<usize, PageWork> = BTreeMap::new();
        for &(e, at) in batch {
            pages.entry(at.page).or_default().push(at.slot, e, served[e].iter().copied());
        }
        for (page, work) in pages {
            self.page(page)?.swiglu(b.x, Work::Host(&work), b.extras, b.act, b.y, b.device)?;
        }
        Ok(())
    }
}

/// The tensors a layer's launches read and write.
struct Buffers<'a> {
    x: &'a burn_cubecl::tensor::CubeTensor,
    act: &'a burn_cubecl::tensor::CubeTensor,
    y: &'a burn_cubecl::tensor::CubeTensor,
    extras: &'a ExpertExtras,
    device: &'a Device,
}
