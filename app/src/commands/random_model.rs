//! `ferry random-model`: a random-weight checkpoint with real MoE shapes, for benchmarks.

use anyhow::{Context, Result};
use ferry_models::random_model;

use crate::args::RandomModelArgs;

pub fn run(args: RandomModelArgs) -> Result<()> {
    if args.out.join("config.json").exists() {
        anyhow::bail!("--out {}: a model is already there", args.out.display());
    }
    if args.preset == "mole" {
        let mut shape = ferry_models::mole::SMALL;
        shape.layers = args.layers.unwrap_or(shape.layers).max(1);
        ferry_models::mole::write_random(&args.out, shape, args.seed)
            .with_context(|| format!("--out {}", args.out.display()))?;
        eprintln!("wrote {} (MoLE: {} layers x {} lookup experts)", args.out.display(), shape.layers, shape.experts);
        return Ok(());
    }
    if args.preset == "qwen3-30b-a3b" {
        let layers = args.layers.unwrap_or(48);
        ferry_models::qwen3_moe::write_random(&args.out, layers, args.seed)
            .with_context(|| format!("--out {}", args.out.display()))?;
        eprintln!("wrote {} (Qwen3-30B-A3B shapes, {layers} layers, random BF16 weights)", args.out.display());
        return Ok(());
    }
    if args.preset == "deepseek-v2-lite" {
        let layers = args.layers.unwrap_or(27);
        ferry_models::deepseek::write_random(&args.out, layers, args.seed)
            .with_context(|| format!("--out {}", args.out.display()))?;
        eprintln!(
            "wrote {} (DeepSeek-V2-Lite shapes, {layers} layers: one dense, then 64 experts top-6 and 2 shared; MLA; \
             random BF16 weights)",
            args.out.display()
        );
        return Ok(());
    }
    if args.preset == "gpt-oss-20b" {
        let layers = args.layers.unwrap_or(24);
        ferry_models::gpt_oss::write_random(&args.out, layers, args.seed)
            .with_context(|| format!("--out {}", args.out.display()))?;
        eprintln!("wrote {} (GPT-OSS-20B shapes, {layers} layers, MXFP4 experts, random weights)", args.out.display());
        return Ok(());
    }
    let shape = random_model::preset(&args.preset, args.layers)?;
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
