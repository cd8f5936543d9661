//! `ferry random-model`: a random-weight checkpoint with real MoE shapes, for benchmarks.

use anyhow::{Context, Result};
use ferry_models::random_model;

use crate::args::RandomModelArgs;

pub fn run(args: RandomModelArgs) -> Result<()> {
    let shape = random_model::preset(&args.preset, args.layers)?;
    if args.out.join("config.json").exists() {
        anyhow::bail!("--out {}: a model is already there", args.out.display());
    }
    random_model::write(&args.out, shape, args.seed).with_context(|| format!("--out {}", args.out.display()))?;
    let spec = ferry_models::read_spec(&args.out)?;
    eprintln!(
        "wrote {} ({} layers x {} experts of {:.1} MiB f32, top-{})",
        args.out.display(),
        spec.num_layers(),
        spec.moe.num_experts,
        (spec.expert_params() * 4) as f64 / 1048576.0,
        spec.moe.top_k
    );
    Ok(())
}
