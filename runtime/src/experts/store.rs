//! Host side of the expert manager: where each routed expert's bytes live in the memory-mapped
//! checkpoint. Nothing is copied until an expert is uploaded.

use std::sync::{Arc, OnceLock};

use super::quant::{ExpertDtype, QuantExpert};
use crate::error::Result;
use crate::spec::{FfnKind, ModelSpec};
use crate::weights::{TensorRef, WeightStore, to_f32};

/// An expert in host memory, ready to upload: f32 in checkpoint layout, or quantised in slot
/// layout.
#[derive(Debug, Clone)]
pub enum HostExpert {
    F32([Vec<f32>; 3]),
    Quant(Arc<QuantExpert>),
}

/// Every routed expert's gate, up and down weights, by (layer, expert).
pub struct ExpertStore {
    weights: Arc<WeightStore>,
    /// `experts[layer][expert]`; empty for dense layers.
    experts: Vec<Vec<[TensorRef; 3]>>,
    hidden: usize,
    intermediate: usize,
    dtype: ExpertDtype,
    /// Quantised experts, made on first use and kept in host RAM (`[layer][expert]`).
    quantised: Vec<Vec<OnceLock<Arc<QuantExpert>>>>,
}

impl ExpertStore {
    /// Looks up and shape-checks every expert tensor, so a bad checkpoint fails at load time
    /// rather than at its first miss.
    pub fn new(weights: Arc<WeightStore>, spec: &ModelSpec, dtype: ExpertDtype) -> Result<Self> {
        let (h, i) = (spec.hidden_size, spec.moe.expert_intermediate_size);
        if spec.layers.contains(&FfnKind::Moe) {
            dtype.check(h, i)?;
        }
        let shapes = [[i, h], [i, h], [h, i]];
        let experts = spec
            .layers
            .iter()
            .enumerate()
            .map(|(layer, kind)| match kind {
                FfnKind::Dense { .. } | FfnKind::Mole => Ok(Vec::new()),
                FfnKind::Moe => (0..spec.moe.num_experts)
                    .map(|e| {
                        let names = spec.names.expert_weights(layer, e);
                        let get = |k: usize| weights.get(&names[k], &shapes[k]).cloned();
                        Ok([get(0)?, get(1)?, get(2)?])
                    })
                    .collect::<Result<Vec<_>>>(),
            })
            .collect::<Result<Vec<_>>>()?;
        let quantised = experts.iter().map(|layer| (0..layer.len()).map(|_| OnceLock::new()).collect()).collect();
        Ok(Self { weights, experts, hidden: h, intermediate: i, dtype, quantised })
    }

    /// The format experts are uploaded in.
    pub fn dtype(&self) -> ExpertDtype {
        self.dtype
    }

    /// Bytes of one expert in its GPU slot (and on the link).
    pub fn slot_bytes(&self) -> u64 {
        self.dtype.expert_bytes(self.hidden, self.intermediate)
    }

    /// The expert as it is uploaded: f32 converted from the checkpoint, or quantised (once, then
    /// kept in host RAM).
    pub fn host(&self, layer: usize, expert: usize) -> HostExpert {
        match self.dtype.bits() {
            None => HostExpert::F32(self.host_f32(layer, expert)),
            Some(bits) => HostExpert::Quant(Arc::clone(self.quantised[layer][expert].get_or_init(|| {
                Arc::new(QuantExpert::new(&self.host_f32(layer, expert), self.hidden, self.intermediate, bits))
            }))),
        }
    }

    /// `(intermediate, hidden)`: gate and up are `[intermediate, hidden]`, down the transpose.
    pub fn dims(&self) -> (usize, usize) {
        (self.intermediate, self.hidden)
    }

    pub fn num_experts(&self, layer: usize) -> usize {
        self.experts.get(layer).map_or(0, Vec::len)
    }

    /// Layers that have routed experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.experts.iter().enumerate().filter(|(_, e)| !e.is_empty()).map(|(l, _)| l)
    }

    /// The expert's gate, up and down weights as f32 in checkpoint layout.
    pub fn host_f32(&self, layer: usize, expert: usize) -> [Vec<f32>; 3] {
        self.experts[layer][expert].each_ref().map(|t| to_f32(self.weights.bytes(t), t.dtype))
    }

    /// Bytes the expert occupies in the checkpoint.
    pub fn source_bytes(&self, layer: usize, expert: usize) -> usize {
        self.experts[layer][expert].iter().map(TensorRef::byte_len).sum()
    }
}
