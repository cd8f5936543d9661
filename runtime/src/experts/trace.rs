//! Routing traces (`ferry trace`): per forward pass and MoE layer, each token's routed experts
//! and weights as the layer used them (after big-little), the predictor's guess for the next MoE
//! layer, and, when asked, the router's inputs and logits (what a predictor is fitted on).

use super::cache::ExpertCache;

/// One MoE layer of one forward pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerTrace {
    pub pass: u64,
    pub layer: usize,
    /// Per token, the experts used in rank order.
    pub experts: Vec<Vec<u32>>,
    /// Per token, their routing weights.
    pub weights: Vec<Vec<f32>>,
    /// The predictor's experts per token for `target`, when the model has a predictor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PredictedTrace>,
    /// The router's input `[tokens, hidden]` and logits `[tokens, experts]`, with
    /// `TraceOptions::inputs` only (not written to trace files).
    #[serde(skip)]
    pub inputs: Option<Vec<f32>>,
    #[serde(skip)]
    pub logits: Option<Vec<f32>>,
    /// The block's input `[tokens, hidden]` as attention takes it (the residual stream after
    /// the input norm), with `TraceOptions::inputs` only: what a pre-attention predictor is
    /// fitted on.
    #[serde(skip)]
    pub block_inputs: Option<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictedTrace {
    /// The MoE layer predicted.
    pub target: usize,
    pub experts: Vec<Vec<u32>>,
}

/// What a trace keeps besides the routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// The router's inputs and logits (reads every layer's tokens back to the host).
    pub inputs: bool,
}

pub(super) struct TraceLog {
    pub(super) options: TraceOptions,
    pub(super) layers: Vec<LayerTrace>,
    /// Block inputs given for layers whose entry is not recorded yet.
    pub(super) block_inputs: Vec<(usize, Vec<f32>)>,
}

impl ExpertCache {
    /// Starts recording (dropping anything unread) or, with None, stops. While tracing, a model
    /// with a predictor computes its predictions even when not prefetching (they are recorded
    /// and scored, not fetched).
    pub fn set_trace(&mut self, options: Option<TraceOptions>) {
        self.trace = options.map(|options| TraceLog { options, layers: Vec::new(), block_inputs: Vec::new() });
    }

    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// The layers recorded since the last call, in the order they ran.
    pub fn take_trace(&mut self) -> Vec<LayerTrace> {
        self.trace.as_mut().map(|t| std::mem::take(&mut t.layers)).unwrap_or_default()
    }

    /// Whether the trace keeps the router's inputs and logits, and the blocks' inputs.
    pub fn traces_inputs(&self) -> bool {
        self.trace.as_ref().is_some_and(|t| t.options.inputs)
    }

    /// The input of MoE layer `layer`'s block before its attention, for the layer's next entry.
    pub fn trace_block_input(&mut self, layer: usize, values: Vec<f32>) {
        if let Some(log) = self.trace.as_mut().filter(|t| t.options.inputs) {
            log.block_inputs.push((layer, values));
        }
    }

    pub(super) fn record_trace(&mut self, mut entry: LayerTrace) {
        if let Some(log) = &mut self.trace {
            if log.options.inputs {
                if let Some(at) = log.block_inputs.iter().position(|(l, _)| *l == entry.layer) {
                    entry.block_inputs = Some(log.block_inputs.remove(at).1);
                }
            } else {
                entry.inputs = None;
                entry.logits = None;
            }
            log.layers.push(entry);
        }
    }
}
