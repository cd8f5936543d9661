//! `ferry trace` (the routing of a text, per forward pass and MoE layer) and `ferry cache-sim`
//! (that trace replayed through the runtime's eviction policies, next to Belady's optimum).

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use ferry_runtime::experts::{
    LayerTrace, SimCache, SimCounts, TraceOptions, belady, fraction_slots, horizon_min, simulate,
};
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::options::{EvictionPolicy, MissPolicy, PrefetchMode, VramBudget};
use strum::IntoEnumIterator;

use crate::args::{CacheSimArgs, TraceArgs};
use crate::load;

/// The first line of a trace file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct TraceHeader {
    /// The format's version.
    pub ferry_trace: u32,
    pub model: String,
    pub moe_layers: Vec<usize>,
    pub experts: usize,
    pub top_k: usize,
    /// What made the `predicted` entries: "next-router", "trained-pregate", "learned", or none.
    pub predictor: Option<String>,
    /// The run's cache: budget, slots, eviction policy, prefetch and miss policy.
    pub budget: String,
    pub slots: usize,
    pub policy: String,
    pub prefetch: String,
    pub miss_policy: String,
    pub tokens: usize,
    pub window: usize,
    pub prompt_tokens: usize,
}

/// The last line: the run's own cache counts over the traced passes.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct TraceEnd {
    pub passes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub prefetched: u64,
    pub host_computed: u64,
}

#[derive(serde::Serialize)]
struct EndLine {
    end: TraceEnd,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Line {
    Header(TraceHeader),
    End { end: TraceEnd },
    Layer(LayerTrace),
}

const VERSION: u32 = 1;

/// Which predictor a model's layers use now (None without two MoE layers).
pub fn predictor_name(model: &Model, prefetch: PrefetchMode) -> Option<String> {
    let moe: Vec<usize> = model.spec().moe_layers();
    let first = *moe.first()?;
    (moe.len() > 1).then(|| {
        if prefetch == PrefetchMode::Learned {
            "learned"
        } else if model.has_trained_pregate(first) {
            "trained-pregate"
        } else {
            "next-router"
        }
        .to_string()
    })
}

pub fn run(args: TraceArgs) -> Result<()> {
    let options = load::expert_options(&args.model)?;
    let mut loaded = load::engine(&args.model, true)?;
    let folder = load::model_folder(&args.model)?;
    let model = &mut loaded.engine.model;
    let tokenizer = loaded.engine.tokenizer.as_ref().context("trace needs tokenizer.json in the model folder")?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("--text {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text, true)?;
    ids.truncate(args.max_tokens);
    if ids.is_empty() {
        anyhow::bail!("--text {}: no tokens to run", args.text.display());
    }
    let spec = model.spec();
    let moe_layers = spec.moe_layers();
    if moe_layers.is_empty() {
        anyhow::bail!("--model {}: no MoE layer to trace", folder.display());
    }
    let window = args.window.min(model.context_limit());
    let prompt_tokens = args.prompt_tokens.min(window);
    let header = TraceHeader {
        ferry_trace: VERSION,
        model: folder.display().to_string(),
        moe_layers,
        experts: spec.moe.num_experts,
        top_k: spec.moe.top_k,
        predictor: predictor_name(model, options.prefetch),
        budget: options.budget.to_string(),
        slots: model.experts().plan().slots,
        policy: options.policy.to_string(),
        prefetch: options.prefetch.to_string(),
        miss_policy: options.miss_policy.to_string(),
        tokens: ids.len(),
        window,
        prompt_tokens,
    };
    let file = std::fs::File::create(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let mut out = BufWriter::new(file);
    let write_err = || format!("writing {}", args.out.display());
    serde_json::to_writer(&mut out, &header).with_context(write_err)?;
    writeln!(out).with_context(write_err)?;

    model.experts_mut().set_trace(Some(TraceOptions::default()));
    let before = model.experts().stats();
    let mut passes = 0u64;
    let mut last_pass = None;
    let result = (|| -> Result<()> {
        for chunk in ids.chunks(window) {
            let mut cache = model.new_cache(chunk.len())?;
            let (prompt, rest) = chunk.split_at(prompt_tokens.min(chunk.len()));
            let steps = std::iter::once(prompt).chain(rest.chunks(1)).filter(|s| !s.is_empty());
            for step in steps {
                model.forward(step, &mut cache, LogitsFor::Last)?;
                for entry in model.experts_mut().take_trace() {
                    if last_pass != Some(entry.pass) {
                        last_pass = Some(entry.pass);
                        passes += 1;
                    }
                    serde_json::to_writer(&mut out, &entry).with_context(write_err)?;
                    writeln!(out).with_context(write_err)?;
                }
            }
        }
        Ok(())
    })();
    model.experts_mut().set_trace(None);
    result?;
    let stats = model.experts().stats() - before;
    let end = TraceEnd {
        passes,
        hits: stats.hits,
        misses: stats.misses,
        evictions: stats.evictions,
        prefetched: stats.prefetched,
        host_computed: stats.host_computed,
    };
    serde_json::to_writer(&mut out, &EndLine { end }).with_context(write_err)?;
    writeln!(out).with_context(write_err)?;
    out.flush().with_context(write_err)?;
    eprintln!(
        "traced {} tokens in {passes} forward passes to {}: {} hits, {} misses at {} ({} slots, {})",
        ids.len(),
        args.out.display(),
        end.hits,
        end.misses,
        header.budget,
        header.slots,
        header.policy
    );
    Ok(())
}

/// A trace file's header, layer lines and end line (absent while it is being written), each
/// checked against the header.
pub fn read_trace(path: &Path) -> Result<(TraceHeader, Vec<LayerTrace>, Option<TraceEnd>)> {
    let file = std::fs::File::open(path).with_context(|| format!("trace {}", path.display()))?;
    let mut header: Option<TraceHeader> = None;
    let mut layers = Vec::new();
    let mut end = None;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line = line.with_context(|| format!("{}: not a text file", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}: not a line of a Ferry trace ({e})", at()))?;
        match (parsed, &header) {
            (Line::Header(h), None) if n == 0 => {
                if h.ferry_trace != VERSION {
                    anyhow::bail!("{}: trace format {} (this ferry reads {VERSION})", at(), h.ferry_trace);
                }
                if h.experts == 0 || h.top_k == 0 || h.top_k > h.experts || h.moe_layers.is_empty() {
                    anyhow::bail!("{}: the header's experts, top_k or moe_layers make no model", at());
                }
                header = Some(h);
            }
            (_, None) => anyhow::bail!("{}: a trace starts with its header line (written by `ferry trace`)", at()),
            (Line::Header(_), Some(_)) => anyhow::bail!("{}: a second header", at()),
            (Line::End { .. }, Some(_)) if end.is_some() => anyhow::bail!("{}: a second end line", at()),
            (Line::End { end: e }, Some(_)) => end = Some(e),
            (Line::Layer(_), Some(_)) if end.is_some() => anyhow::bail!("{}: a layer after the end line", at()),
            (Line::Layer(layer), Some(h)) => {
                check_layer(&layer, h).map_err(|why| anyhow::anyhow!("{}: {why}", at()))?;
                layers.push(layer);
            }
        }
    }
    let header = header.with_context(|| format!("trace {}: empty", path.display()))?;
    Ok((header, layers, end))
}

fn check_layer(layer: &LayerTrace, header: &TraceHeader) -> std::result::Result<(), String> {
    if !header.moe_layers.contains(&layer.layer) {
        return Err(format!("layer {} is not one of the header's MoE layers {:?}", layer.layer, header.moe_layers));
    }
    if layer.weights.len() != layer.experts.len()
        || layer.experts.iter().zip(&layer.weights).any(|(e, w)| e.len() != w.len())
    {
        return Err("experts and weights differ in length".into());
    }
    let experts = layer.experts.iter().flatten().chain(layer.predicted.iter().flat_map(|p| p.experts.iter().flatten()));
    if let Some(bad) = experts.copied().find(|&e| e as usize >= header.experts) {
        return Err(format!("expert {bad} of a model with {} experts per layer", header.experts));
    }
    if let Some(p) = &layer.predicted
        && !header.moe_layers.contains(&p.target)
    {
        return Err(format!("a prediction for layer {}, not a MoE layer", p.target));
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct PolicyRow {
    policy: String,
    #[serde(flatten)]
    counts: SimCounts,
    hit_rate: f64,
}

#[derive(serde::Serialize)]
struct BudgetRow {
    budget: String,
    slots: usize,
    policies: Vec<PolicyRow>,
    /// MIN knowing next uses only within the current forward pass, and within it and the next:
    /// the most a perfect predictor of the coming layers (or of one more token) could add.
    min_this_pass: PolicyRow,
    min_next_pass: PolicyRow,
    belady: PolicyRow,
}

#[derive(serde::Serialize)]
struct RuntimeCheck {
    budget: String,
    slots: usize,
    policy: String,
    runtime_hits: u64,
    runtime_misses: u64,
    replayed_hits: u64,
    replayed_misses: u64,
    equal: bool,
}

#[derive(serde::Serialize)]
struct SimReport {
    trace: String,
    passes: usize,
    accesses: u64,
    budgets: Vec<BudgetRow>,
    /// The trace's own run replayed at its budget and policy (when it neither prefetched nor
    /// computed misses on the host, the counts must be equal).
    runtime: Option<RuntimeCheck>,
}

fn row(policy: String, counts: SimCounts) -> PolicyRow {
    PolicyRow { policy, hit_rate: counts.hit_rate(), counts }
}

pub fn cache_sim(args: CacheSimArgs) -> Result<()> {
    let (header, layers, end) = read_trace(&args.trace)?;
    if layers.is_empty() {
        anyhow::bail!("trace {}: no forward pass recorded", args.trace.display());
    }
    let total = header.moe_layers.len() * header.experts;
    let policies: Vec<EvictionPolicy> =
        if args.policy.is_empty() { EvictionPolicy::iter().collect() } else { args.policy.clone() };
    let cache =
        |slots, policy| SimCache { slots, policy, min_slots: header.top_k, moe_layers: header.moe_layers.len() };
    let mut budgets = Vec::new();
    for budget in &args.budget {
        let slots = match *budget {
            VramBudget::All => total,
            VramBudget::FractionOfExperts(f) => fraction_slots(total, f),
            VramBudget::Bytes(_) => anyhow::bail!(
                "--budget {budget}: cache-sim takes shares of the routed experts (e.g. 25%) or all; a size in bytes \
                 depends on the adapter and formats"
            ),
        };
        if slots < header.top_k {
            let why = format!("{slots} of the trace's {total} experts, fewer than one layer's top-{}", header.top_k);
            // The default list starts at 5%, too few slots for a small model: those are skipped.
            if args.budget.len() == 1 {
                anyhow::bail!("--budget {budget}: {why}");
            }
            eprintln!("--budget {budget}: {why}; skipped");
            continue;
        }
        let policies = policies.iter().map(|&p| row(p.to_string(), simulate(&layers, cache(slots, p)))).collect();
        budgets.push(BudgetRow {
            budget: budget.to_string(),
            slots,
            policies,
            min_this_pass: row("min-this-pass".into(), horizon_min(&layers, slots, 0)),
            min_next_pass: row("min-next-pass".into(), horizon_min(&layers, slots, 1)),
            belady: row("belady".into(), belady(&layers, slots)),
        });
    }
    let runtime = end.and_then(|end| {
        let policy: EvictionPolicy = header.policy.parse().ok()?;
        let replay = simulate(&layers, cache(header.slots.max(header.top_k), policy));
        Some(RuntimeCheck {
            budget: header.budget.clone(),
            slots: header.slots,
            policy: header.policy.clone(),
            runtime_hits: end.hits,
            runtime_misses: end.misses,
            replayed_hits: replay.hits,
            replayed_misses: replay.misses,
            equal: replay.hits == end.hits && replay.misses == end.misses,
        })
    });
    if budgets.is_empty() {
        anyhow::bail!("--budget: every budget gives fewer slots than one layer's top-{}", header.top_k);
    }
    let mut passes: Vec<u64> = layers.iter().map(|l| l.pass).collect();
    passes.dedup();
    let report = SimReport {
        trace: args.trace.display().to_string(),
        passes: passes.len(),
        accesses: budgets.first().map_or(0, |b| b.belady.counts.accesses),
        budgets,
        runtime,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} forward passes, {} expert accesses ({} MoE layers x {} experts, top-{})",
        report.trace,
        report.passes,
        report.accesses,
        header.moe_layers.len(),
        header.experts,
        header.top_k
    );
    print!("{:>8} {:>6}", "budget", "slots");
    for p in &policies {
        print!(" {:>11}", p.to_string());
    }
    println!(" {:>14} {:>14} {:>11}", "min-this-pass", "min-next-pass", "belady");
    for b in &report.budgets {
        print!("{:>8} {:>6}", b.budget, b.slots);
        for p in &b.policies {
            print!(" {:>10.1}%", 100.0 * p.hit_rate);
        }
        println!(
            " {:>13.1}% {:>13.1}% {:>10.1}%",
            100.0 * b.min_this_pass.hit_rate,
            100.0 * b.min_next_pass.hit_rate,
            100.0 * b.belady.hit_rate
        );
    }
    if let Some(r) = &report.runtime {
        let exact =
            header.prefetch == PrefetchMode::None.to_string() && header.miss_policy == MissPolicy::Upload.to_string();
        println!(
            "the trace's own run ({}, {} slots, {}): {} hits, {} misses; replayed: {} hits, {} misses{}",
            r.budget,
            r.slots,
            r.policy,
            r.runtime_hits,
            r.runtime_misses,
            r.replayed_hits,
            r.replayed_misses,
            match (r.equal, exact) {
                (true, _) => " (equal)",
                (false, true) => " (DIFFERENT: the simulator does not follow the runtime)",
                (false, false) => " (the run prefetched or computed misses on the host, which the replay does not)",
            }
        );
    }
    Ok(())
}
