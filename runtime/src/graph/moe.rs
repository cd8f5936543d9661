//! The mixture-of-experts block: router on the GPU, the routing rule on the device or the host
//! (`--route-on`), then the expert manager runs every chosen expert over the tokens routed to it
//! (`ExpertCache::run_layer`, or `run_layer_on_device` when the routes stay there), plus the
//! shared expert where the family has one.

use std::sync::Arc;

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use ferry_shaders::cube_float;

use super::ffn::SwiGlu;
use super::linear::{Linear, Loader};
use super::residual::Head;
use crate::error::Result;
use ferry_shaders::expert::ExpertExtras;

use crate::experts::{ExpertCache, LayerExtras, LayerOutput, LayerRequest, Prediction};
use crate::routing::{TokenRoute, route};
use crate::spec::{ExpertActivation, ModelSpec, RouterKind};

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
    /// A learned predictor's hidden layer: `router`'s last `width` columns are its
    /// pre-activations, and the host adds its output to the logits before them.
    pub head: Option<Arc<Head>>,
}

impl PreGate {
    /// The target layer's experts: the columns of `router` before any hidden layer's.
    pub fn targets(&self) -> usize {
        self.router.outputs() - self.head.as_ref().map_or(0, |h| h.width)
    }

    /// One token's predicted logits from its score row, whose columns from `at` are this
    /// predictor's (and the hidden layer's after them).
    fn logits(&self, row: &[f32], at: usize) -> Vec<f32> {
        let end = at + self.targets();
        let mut logits = row[at..end].to_vec();
        if let Some(head) = &self.head {
            head.add_to(&row[end..end + head.width], &mut logits);
        }
        logits
    }
}

/// What a forward pass hands one MoE block besides its tokens.
pub struct MoePass {
    /// Experts to predict per token for the next MoE layer and prefetch (None: no prefetch).
    pub prefetch_k: Option<usize>,
    /// The attention each token received in this layer (`--importance attention`).
    pub received: Option<Tensor<2>>,
    /// Routes chosen for this layer by the previous layer's predictor (`--pregate-routing`).
    pub routes: Option<Vec<TokenRoute>>,
    /// Whether to return the predictor's routes for the next MoE layer.
    pub pregate_routing: bool,
}

/// A MoE block's output: `parts` rows per token to be summed in order, the routes used, and
/// under `--pregate-routing` the next MoE layer's routes.
pub struct MoeOutput {
    pub rows: Tensor<2>,
    pub parts: usize,
    pub routes: Vec<TokenRoute>,
    pub next: Option<Vec<TokenRoute>>,
    /// Routes left on the device (`[tokens, 2 * top_k]`, `ferry_shaders::route`'s output) when
    /// the layer ran without reading them back; `routes` is empty then, and the caller reads
    /// these once per pass and hands them to `ExpertCache::count_device_routes`.
    pub device_routes: Option<Tensor<2>>,
}

/// Router and shared expert of one layer; the routed experts live in the `ExpertCache`.
pub struct MoeBlock {
    layer: usize,
    router: Linear,
    /// Per-expert selection bias (DeepSeek-V3's `e_score_correction_bias`), and on the device
    /// for the routing kernel.
    score_bias: Option<Vec<f32>>,
    score_bias_device: Option<CubeTensor>,
    pregate: Option<PreGate>,
    /// The router and the pre-gate as one projection (`[own | predicted]` columns), so that a
    /// pass with prefetching runs one launch for both; set with the pre-gate.
    router_and_pregate: Option<Linear>,
    shared: Option<SharedExpert>,
    /// Routed experts' biases and activation, for the kernels.
    extras: ExpertExtras,
    /// The same on the host, for experts computed there (`--miss-policy`).
    host_extras: LayerExtras,
    num_experts: usize,
    top_k: usize,
    kind: RouterKind,
    /// Route with the device kernel (`--route-on`), where the rule allows.
    on_device: bool,
}

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
        let clamp = match moe.activation {
            ExpertActivation::Silu => None,
            ExpertActivation::ClampedSwiglu { limit, alpha } => Some((limit, alpha)),
        };
        let host_extras = LayerExtras { bias: bias.clone(), clamp };
        let extras = ExpertExtras::new(bias, clamp, loader.split, loader.device)?;
        let score_bias_device = match &score_bias {
            Some(b) => Some(cube_float(Tensor::<1>::from_data(TensorData::new(b.clone(), [b.len()]), loader.device))?),
            None => None,
        };
        Ok(Self {
            layer,
            router,
            score_bias,
            score_bias_device,
            extras,
            host_extras,
            pregate: None,
            router_and_pregate: None,
            shared,
            num_experts: moe.num_experts,
            top_k: moe.top_k,
            kind: moe.router,
            on_device: loader.route_on_device && crate::routing::rule(moe.router).on_device(),
        })
    }

    /// Routes with the device kernel from now on (`--route-on`), where the rule allows.
    pub fn set_route_on_device(&mut self, on: bool) {
        self.on_device = on && crate::routing::rule(self.kind).on_device();
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    pub fn router(&self) -> &Linear {
        &self.router
    }

    pub fn score_bias(&self) -> Option<&[f32]> {
        self.score_bias.as_deref()
    }

    pub fn set_pregate(&mut self, pregate: PreGate) -> Result<()> {
        self.router_and_pregate = Some(Linear::concat(&[&self.router, &pregate.router])?);
        self.pregate = Some(pregate);
        Ok(())
    }

    pub fn pregate(&self) -> Option<&PreGate> {
        self.pregate.as_ref()
    }

    /// `x` `[tokens, hidden]` (already normed). Returns the block output, as `parts` rows per
    /// token to be summed in order (`[tokens * parts, hidden]`: the weighted expert output of each
    /// rank, or one row when a shared expert is added here), and each token's route.
    ///
    /// The router runs here and the routing rule on the device or the host; the expert manager
    /// does the rest (`ExpertCache::run_layer`). With `prefetch_k`, the pre-gate's
    /// top-`prefetch_k` experts for the next MoE layer go with it. `received` `[tokens, 1]` is the
    /// attention each token received in this layer (computed only for `--importance attention`).
    pub fn forward(
        &self,
        x: Tensor<2>,
        experts: &mut ExpertCache,
        pass: MoePass,
        device: &Device,
    ) -> Result<MoeOutput> {
        let MoePass { prefetch_k, received, routes: given, pregate_routing } = pass;
        let tokens = x.dims()[0];
        // A trace records the predictor's guesses even when nothing is prefetched, and under
        // --pregate-routing they are the next layer's routing.
        let predict_k = prefetch_k.or((experts.tracing() || pregate_routing).then_some(self.top_k));
        let pregate = self.pregate.as_ref().filter(|_| predict_k.is_some());
        // One read-back serves the routing, the prediction and the received attention:
        // columns [own router | pre-gate | received].
        let scores = match (pregate, &self.router_and_pregate) {
            (Some(_), Some(both)) => both.forward(x.clone()),
            _ => self.router.forward(x.clone()),
        };
        let rule = crate::routing::rule(self.kind);
        let k = self.top_k;
        let on_device = self.on_device;
        // A decode step with every expert resident and nothing to read on the host keeps its
        // routes on the device: no wait for the host between layers.
        if tokens == 1
            && given.is_none()
            && pregate.is_none()
            && received.is_none()
            && on_device
            && experts.routes_stay_on_device(self.layer, k)
        {
            let router = ferry_shaders::route::Router {
                logits: scores,
                bias: self.score_bias_device.as_ref(),
                experts: self.num_experts,
                top_k: k,
                rule,
            };
            let (rows, routes) = experts.run_layer_on_device(self.layer, x.clone(), router, &self.extras, device)?;
            let (rows, parts) = self.add_shared(rows, x, k);
            return Ok(MoeOutput { rows, parts, routes: Vec::new(), next: None, device_routes: Some(routes) });
        }
        let has_received = received.is_some();
        // With misses that may be computed on the host, the tokens come back in the same read.
        let host_tokens = experts.wants_host_tokens();
        // Under device routing every mode routes with the kernel, so offloaded runs weigh experts
        // with the bits resident ones do; routes given by the previous layer's predictor need none.
        let routed = (given.is_none() && on_device)
            .then(|| {
                ferry_shaders::route::route(scores.clone(), self.score_bias_device.as_ref(), self.num_experts, k, rule)
            })
            .transpose()?;
        let routes_width = if routed.is_some() { 2 * k } else { 0 };
        let scores_width = scores.dims()[1];
        let mut parts = vec![scores];
        parts.extend(received);
        parts.extend(routed);
        if host_tokens {
            parts.push(x.clone());
        }
        let columns = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 1) };
        let logits = super::read_f32(columns, "router logits")?;
        let row = logits.len() / tokens;
        // Columns: [own router | pre-gate | received | routes | tokens].
        let routes_at = scores_width + usize::from(has_received);
        let x_host: Option<Vec<f32>> = host_tokens
            .then(|| logits.chunks_exact(row).flat_map(|r| &r[routes_at + routes_width..]).copied().collect());
        let targets = pregate.map_or(0, PreGate::targets);
        let own: Vec<f32> = logits.chunks_exact(row).flat_map(|r| &r[..self.num_experts]).copied().collect();
        let received: Option<Vec<f32>> =
            has_received.then(|| logits.chunks_exact(row).map(|r| r[scores_width]).collect());
        let routes = match given {
            Some(routes) => routes,
            None if routes_width > 0 => logits
                .chunks_exact(row)
                .flat_map(|r| ferry_shaders::route::parse(&r[routes_at..routes_at + routes_width], k))
                .map(|(experts, weights)| TokenRoute { experts, weights })
                .collect(),
            None => route(&own, self.score_bias.as_deref(), self.num_experts, k, self.kind),
        };
        let predicted: Vec<f32> = match pregate {
            Some(p) => logits.chunks_exact(row).flat_map(|r| p.logits(r, self.num_experts)).collect(),
            None => Vec::new(),
        };
        // The target's routing rule (all MoE layers of a model share the router kind).
        let next = pregate.filter(|_| pregate_routing).map(|p| {
            let k = self.top_k.min(targets);
            route(&predicted, p.score_bias.as_deref(), targets, k, self.kind)
        });
        let prediction = pregate.zip(predict_k).map(|(p, predict_k)| Prediction {
            target: p.target,
            logits: &predicted,
            routes: route(&predicted, p.score_bias.as_deref(), targets, predict_k.min(targets), self.kind),
            predict_k,
            top_k: self.top_k,
            fetch: prefetch_k.is_some(),
        });
        let request = LayerRequest {
            layer: self.layer,
            x: x.clone(),
            routes,
            logits: &own,
            received: received.as_deref(),
            top_k: self.top_k,
            extras: &self.extras,
            host_extras: &self.host_extras,
            x_host: x_host.as_deref(),
            prediction,
        };
        let LayerOutput { rows, routes } = experts.run_layer(request, device)?;
        let (rows, parts) = self.add_shared(rows, x, k);
        Ok(MoeOutput { rows, parts, routes, next, device_routes: None })
    }

    /// The routed rows (`k` per token) as they are, or summed per token with the shared
    /// expert's output added where the family has one: the rows and their parts per token.
    fn add_shared(&self, rows: Tensor<2>, x: Tensor<2>, k: usize) -> (Tensor<2>, usize) {
        let Some(shared) = &self.shared else { return (rows, k) };
        let [tokens, hidden] = x.dims();
        let mut y = shared.mlp.forward(x.clone());
        if let Some(gate) = &shared.gate {
            y = y * sigmoid(gate.forward(x));
        }
        (rows.reshape([tokens, k, hidden]).sum_dim(1).reshape([tokens, hidden]) + y, 1)
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
