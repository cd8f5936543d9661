//! The mixture-of-experts block: router on the GPU, routing decision on the host, then each
//! chosen expert runs over the tokens routed to it and its weighted output is added back.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::ffn::SwiGlu;
use super::linear::{Linear, Loader};
use crate::error::{FerryError, Result};
use crate::routing::{TokenRoute, route};
use crate::spec::ModelSpec;

struct SharedExpert {
    mlp: SwiGlu,
    gate: Option<Linear>,
}

pub struct MoeBlock {
    router: Linear,
    experts: Vec<SwiGlu>,
    shared: Option<SharedExpert>,
    num_experts: usize,
    top_k: usize,
    kind: crate::spec::RouterKind,
}

impl MoeBlock {
    pub fn load(loader: &Loader, spec: &ModelSpec, layer: usize) -> Result<Self> {
        let names = &spec.names;
        let h = spec.hidden_size;
        let moe = &spec.moe;
        let router_name = names.layer(layer, &names.router);
        let router = loader.linear(router_name.trim_end_matches(".weight"), h, moe.num_experts, false)?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                let [g, u, d] = names.expert_weights(layer, e);
                let prefixes =
                    [g.trim_end_matches(".weight"), u.trim_end_matches(".weight"), d.trim_end_matches(".weight")];
                SwiGlu::load(loader, prefixes, h, moe.expert_intermediate_size)
            })
            .collect::<Result<Vec<_>>>()?;
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
        Ok(Self { router, experts, shared, num_experts: moe.num_experts, top_k: moe.top_k, kind: moe.router })
    }

    /// `x` `[tokens, hidden]` (already normed). Returns the block output and each token's route.
    pub fn forward(&self, x: Tensor<2>, device: &Device) -> Result<(Tensor<2>, Vec<TokenRoute>)> {
        let [tokens, hidden] = x.dims();
        let logits = self.router.forward(x.clone());
        let logits: Vec<f32> =
            logits.into_data().try_into_vec().map_err(|e| FerryError::Gpu(format!("reading router logits: {e:?}")))?;
        let routes = route(&logits, self.num_experts, self.top_k, self.kind);

        // Group tokens by expert; experts run in index order, as transformers accumulates them.
        let mut assigned: Vec<(Vec<i64>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.num_experts];
        for (t, r) in routes.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                assigned[e as usize].0.push(t as i64);
                assigned[e as usize].1.push(w);
            }
        }
        let mut out = Tensor::<2>::zeros([tokens, hidden], device);
        for (expert, (rows, weights)) in self.experts.iter().zip(assigned) {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), device);
            let weights = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), device);
            let y = expert.forward(x.clone().select(0, index.clone())) * weights;
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
