//! Runs the plan: one copy of the model per format, every mode of a format in interleaved
//! rounds over the same request, so that a burst of machine noise hits every mode.

use std::path::Path;

use anyhow::{Context, Result};
use ferry_runtime::Gpu;
use ferry_runtime::engine::{Engine, GenerateOutput, GenerateRequest};
use ferry_runtime::experts::SlotPlan;
use ferry_runtime::graph::Model;
use ferry_runtime::options::{DenseDtype, ExpertDtype, ExpertOptions};

use super::plan::{Group, Mode, ModeKind, Plan};

/// One generation of the bench request in one mode.
pub struct Run {
    pub output: GenerateOutput,
    /// Per MoE layer after the first: share of real top-k choices that had been predicted.
    pub recall_per_layer: Vec<Option<f64>>,
    pub plan: SlotPlan,
}

/// A mode and its runs, one per round.
pub struct Measured {
    pub mode: Mode,
    pub runs: Vec<Run>,
}

/// Measures every group of the plan. `base` is the f32 model (already warmed up); other formats
/// load their own copy, one at a time.
pub fn measure(
    plan: Plan,
    base: &mut Engine,
    folder: &Path,
    gpu: &Gpu,
    request: &GenerateRequest,
    rounds: u32,
    base_options: ExpertOptions,
) -> Result<Vec<Measured>> {
    let mut measured = Vec::new();
    let mut copy: Option<Engine> = None;
    for Group { dtype, dense, modes } in plan.groups {
        if (dtype, dense) != (ExpertDtype::F32, DenseDtype::F32) {
            // Drop the previous copy before uploading the next.
            drop(copy.take());
            let opened = ferry_models::open(folder)?;
            let options = ExpertOptions { expert_dtype: dtype, dense_dtype: dense, ..base_options };
            let mut loaded = Engine::new(Model::load_with(opened.spec, &opened.weights, &gpu.device, options)?, None);
            loaded.generate(request, |_| {})?;
            copy = Some(loaded);
        }
        let engine = copy.as_mut().unwrap_or(&mut *base);
        let mut runs: Vec<Vec<Run>> = (0..modes.len()).map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (mode, runs) in modes.iter().zip(&mut runs) {
                runs.push(run_mode(engine, mode, request, base_options)?);
            }
        }
        measured.extend(modes.into_iter().zip(runs).map(|(mode, runs)| Measured { mode, runs }));
    }
    Ok(measured)
}

fn run_mode(engine: &mut Engine, mode: &Mode, request: &GenerateRequest, base: ExpertOptions) -> Result<Run> {
    engine.model.set_expert_options(ExpertOptions {
        expert_dtype: mode.dtype,
        dense_dtype: mode.dense,
        budget: mode.budget,
        policy: mode.policy,
        kv_tokens: None,
        prefetch: mode.prefetch,
        link: mode.link,
        big_little: mode.big_little,
        miss_policy: mode.miss,
        routing: mode.routing,
        ..base
    })?;
    if mode.kind == ModeKind::Offload {
        // Every offloaded mode starts cold, as a fresh process would.
        engine.model.experts_mut().clear();
    }
    let recall_before = engine.model.experts().recall().to_vec();
    let output =
        engine.generate(request, |_| {}).with_context(|| format!("bench mode {} {}", mode.kind.name(), mode.budget))?;
    let recall_per_layer: Vec<Option<f64>> = engine
        .model
        .experts()
        .recall()
        .iter()
        .zip(&recall_before)
        .filter(|(after, _)| after.actual > 0)
        .map(|(after, before)| {
            let actual = after.actual - before.actual;
            (actual > 0).then(|| (after.predicted - before.predicted) as f64 / actual as f64)
        })
        .collect();
    let plan = engine.model.experts().plan().clone();
    Ok(Run { output, recall_per_layer, plan })
}
