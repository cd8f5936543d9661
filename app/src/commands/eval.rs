//! `ferry eval`: the quality cost of an approximate mode, measured against full mode on the same
//! text in one run: teacher-forced perplexity of each, and how often their argmax agrees.

use anyhow::{Context, Result};
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::options::ExpertDtype;
use ferry_runtime::options::{DenseDtype, ExpertOptions, MissPolicy, VramBudget};
use ferry_runtime::routing::softmax;
use ferry_runtime::spec::FfnKind;

use crate::args::EvalArgs;
use crate::load;

/// Per-position logits over the text, in context-sized windows (each window starts fresh).
fn logits_over(model: &mut Model, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let window = model.spec().max_position_embeddings.min(512);
    let mut all = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(window) {
        let mut cache = model.new_cache(chunk.len())?;
        all.extend(model.forward(chunk, &mut cache, LogitsFor::All)?.logits);
    }
    Ok(all)
}

/// Perplexity of `ids` given per-position logits (position i predicts token i + 1; window
/// boundaries included, as each window's first token is predicted from the previous window's
/// last logits only when they share a window, so those are skipped).
fn perplexity(logits: &[Vec<f32>], ids: &[u32], window: usize) -> f64 {
    let mut nll = 0.0f64;
    let mut count = 0usize;
    for i in 0..ids.len().saturating_sub(1) {
        if (i + 1) % window == 0 {
            continue;
        }
        let p = softmax(&logits[i])[ids[i + 1] as usize].max(f32::MIN_POSITIVE);
        nll -= f64::from(p.ln());
        count += 1;
    }
    (nll / count.max(1) as f64).exp()
}

fn argmax(row: &[f32]) -> usize {
    ferry_runtime::sampling::argmax(row) as usize
}

pub fn run(args: EvalArgs) -> Result<()> {
    let mut loaded = load::engine(&args.model, true)?;
    let model = &mut loaded.engine.model;
    let tokenizer = loaded.engine.tokenizer.as_ref().context("eval needs tokenizer.json in the model folder")?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("--text {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text, true)?;
    ids.truncate(args.max_tokens);
    if ids.len() < 2 {
        anyhow::bail!("--text {}: fewer than two tokens to score", args.text.display());
    }
    let window = model.spec().max_position_embeddings.min(512);
    let options = load::expert_options(&args.model)?;

    // Full mode is exact: every expert of the top-k, experts and projections in f32. Formats
    // are fixed at load, so the reference of a quantised or f16 model is a second, f32 copy.
    // Missed experts uploaded, not computed on the host; a budget of no slots gets the fewest
    // that work (offloaded output equals resident output, so the budget does not matter).
    let budget = if options.budget == VramBudget::FractionOfExperts(0.0) {
        let spec = model.spec();
        let total = spec.layers.iter().filter(|l| **l == FfnKind::Moe).count() * spec.moe.num_experts;
        VramBudget::FractionOfExperts(((spec.moe.top_k as f64 + 0.5) / total.max(1) as f64).min(1.0))
    } else {
        options.budget
    };
    let exact = ExpertOptions {
        big_little: None,
        expert_dtype: ExpertDtype::F32,
        dense_dtype: DenseDtype::F32,
        miss_policy: MissPolicy::Upload,
        pregate_routing: false,
        budget,
        ..options
    };
    let full = if options.expert_dtype == ExpertDtype::F32 && options.dense_dtype == DenseDtype::F32 {
        model.set_expert_options(exact)?;
        let full = logits_over(model, &ids)?;
        model.set_expert_options(options)?;
        full
    } else {
        let source = load::Source {
            folder: load::model_folder(&args.model)?,
            adapter: args.model.adapter,
            options: exact,
            lut_cache: 0,
        };
        logits_over(&mut load::engine_from(&source, false, |_| {})?.engine.model, &ids)?
    };
    let before = model.experts().stats();
    let mode = logits_over(model, &ids)?;
    let stats = model.experts().stats() - before;

    let ppl_full = perplexity(&full, &ids, window);
    let ppl_mode = perplexity(&mode, &ids, window);
    let agree = full.iter().zip(&mode).filter(|(a, b)| argmax(a) == argmax(b)).count() as f64 / full.len() as f64;
    let value = serde_json::json!({
        "tokens": ids.len(),
        "experts": args.model.big_little.experts,
        "expert_dtype": options.expert_dtype,
        "dense_dtype": options.dense_dtype,
        "miss_policy": options.miss_policy,
        "pregate_routing": options.pregate_routing,
        "importance": args.model.big_little.importance,
        "big_fraction": args.model.big_little.big_fraction,
        "perplexity_full": ppl_full,
        "perplexity_mode": ppl_mode,
        "perplexity_delta": ppl_mode - ppl_full,
        "argmax_agreement_with_full": agree,
        "big_share": stats.big as f64 / (stats.big + stats.little).max(1) as f64,
        "expert_stats": stats,
    });
    if args.json {
        println!("{value}");
    } else {
        println!("{} tokens of {}", ids.len(), args.text.display());
        println!(
            "perplexity full f32 {ppl_full:.4}, {} experts {} projections {} {ppl_mode:.4} (delta {:+.4})",
            args.model.big_little.experts,
            options.expert_dtype,
            options.dense_dtype,
            ppl_mode - ppl_full
        );
        println!("argmax agreement with full: {:.1}%", 100.0 * agree);
        if options.pregate_routing {
            println!("mode routing: each MoE layer after the first by its predecessor's pre-gate (--pregate-routing)");
        }
        if stats.host_computed > 0 {
            println!(
                "miss policy {}: {} of {} expert uses computed on the host",
                options.miss_policy,
                stats.host_computed,
                stats.hits + stats.misses
            );
        }
        if stats.big + stats.little > 0 {
            println!(
                "big share {:.1}% of token-layer choices",
                100.0 * stats.big as f64 / (stats.big + stats.little) as f64
            );
        }
    }
    Ok(())
}
