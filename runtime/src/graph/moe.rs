//! The mixture-of-experts block: router on the GPU, routing decision on the host, then each
//! chosen expert (fetched from the expert cache) runs over the tokens routed to it.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::ffn::SwiGlu;
use super::linear::{Linear, Loader};
use crate::error::{FerryError, Result};
use crate::experts::ExpertCache;
use crate::routing::{TokenRoute, route};
use crate::spec::{ModelSpec, RouterKind};

struct SharedExpert {
    mlp: SwiGlu,
    gate: Option<Linear>,
}

/// Router and shared expert of one layer; the routed experts live in the `ExpertCache`.
pub struct MoeBlock {
    layer: usize,
    router: Linear,
    shared: Option<SharedExpert>,
    num_experts: usize,
    top_k: usize,
    kind: RouterKind,
}

/// The tokens one expert serves: their rows in the batch and their routing weights.
struct Assignment {
    rows: Vec<i64>,
    weights: Vec<f32>,
}

impl MoeBlock {
    pub fn load(loader: &Loader, spec: &ModelSpec, layer: usize) -> Result<Self> {
        let names = &spec.names;
        let h = spec.hidden_size;
        let moe = &spec.moe;
        let router_name = names.layer(layer, &names.router);
        let router = loader.linear(router_name.trim_end_matches(".weight"), h, moe.num_experts, false)?;
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
        Ok(Self { layer, router, shared, num_experts: moe.num_experts, top_k: moe.top_k, kind: moe.router })
    }

    /// `x` `[tokens, hidden]` (already normed). Returns the block output and each token's route.
    ///
    /// Experts already resident run first, then the misses (each uploaded once, even when the
    /// cache has fewer slots than this layer needs); their outputs are summed in expert order
    /// whatever the residency, so offloaded output equals all-resident output bit for bit.
    pub fn forward(
        &self,
        x: Tensor<2>,
        experts: &mut ExpertCache,
        device: &Device,
    ) -> Result<(Tensor<2>, Vec<TokenRoute>)> {
        let [tokens, hidden] = x.dims();
        let logits: Vec<f32> = self
            .router
            .forward(x.clone())
            .into_data()
            .try_into_vec()
            .map_err(|e| FerryError::Gpu(format!("reading router logits: {e:?}")))?;
        let routes = route(&logits, self.num_experts, self.top_k, self.kind);

        let mut assigned: Vec<Assignment> =
            (0..self.num_experts).map(|_| Assignment { rows: Vec::new(), weights: Vec::new() }).collect();
        for (t, r) in routes.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                assigned[e as usize].rows.push(t as i64);
                assigned[e as usize].weights.push(w);
            }
        }
        let needed: Vec<usize> = (0..self.num_experts).filter(|&e| !assigned[e].rows.is_empty()).collect();
        let (hits, misses): (Vec<usize>, Vec<usize>) =
            needed.iter().partition(|&&e| experts.is_resident(self.layer, e));
        let mut outputs: Vec<Option<(Tensor<1, Int>, Tensor<2>)>> = (0..self.num_experts).map(|_| None).collect();
        for e in hits.into_iter().chain(misses) {
            let weights = experts.fetch(self.layer, e)?;
            let a = &assigned[e];
            let n = a.rows.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(a.rows.clone(), [n]), device);
            let scale = Tensor::<2>::from_data(TensorData::new(a.weights.clone(), [n, 1]), device);
            let y = weights.forward(x.clone().select(0, index.clone())) * scale;
            outputs[e] = Some((index, y));
        }
        let mut out = Tensor::<2>::zeros([tokens, hidden], device);
        for (index, y) in outputs.into_iter().flatten() {
            out = out.select_assign(0, index, y, IndexingUpdateOp::Add);
        }
        if let Some(shared) = &self.shared {
            let mut y = shared.mlp.forward(x.clone());
            if let Some(gate) = &shared.gate {
                y = y * sigmoid(gate.forward(x));
            }
            out = out + y;
        }
        Ok((out, routes))
    }
}
