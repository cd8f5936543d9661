//! `ferry bench`: all-resident and offloaded modes measured in one run on the same prompt, so
//! their ratios are not spoiled by machine noise between runs.

use anyhow::{Context, Result};
use ferry_runtime::engine::{Engine, GenerateRequest, GenerateStats};
use ferry_runtime::experts::{EvictionPolicy, VramBudget, measure_upload};
use ferry_runtime::graph::{ExpertOptions, Model};
use ferry_runtime::sampling::SamplingConfig;
use ferry_runtime::{AdapterChoice, Gpu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::args::BenchArgs;

/// One measured mode.
#[derive(serde::Serialize)]
struct ModeReport {
    mode: String,
    vram_budget: String,
    policy: EvictionPolicy,
    slots: usize,
    total_experts: usize,
    gpu_bytes: u64,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    time_to_first_token_seconds: f64,
    /// Over decode steps.
    hit_rate: f64,
    misses_per_token: f64,
    bytes_uploaded_per_token: f64,
    /// Decode time spent waiting on uploads.
    stall_fraction: f64,
    /// Decode tokens/s relative to all-resident in this run.
    decode_ratio_to_resident: f64,
    prefill_uploaded_bytes: u64,
    ids: Vec<u32>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let folder = match &args.model {
        Some(folder) => folder.clone(),
        None => ferry_models::random_model::ensure()?,
    };
    let opened = ferry_models::open(&folder)?;
    let gpu = Gpu::open(args.adapter.parse::<AdapterChoice>()?)?;
    let spec = opened.spec.clone();
    let model = Model::load(opened.spec, &opened.weights, &gpu.device)?;
    let engine = Engine::new(model, None);

    let mut rng = StdRng::seed_from_u64(args.seed);
    let prompt: Vec<u32> = (0..args.prompt_len.max(1))
        .map(|_| {
            loop {
                let id = rng.random_range(0..spec.vocab_size as u32);
                if !spec.eos_token_ids.contains(&id) {
                    break id;
                }
            }
        })
        .collect();
    let request = GenerateRequest {
        prompt_ids: prompt.clone(),
        max_new_tokens: args.gen_len.max(2),
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    };
    // Shader compilation and autotuning happen on first use; keep them out of every mode.
    let warmup =
        GenerateRequest { prompt_ids: prompt[..prompt.len().min(8)].to_vec(), max_new_tokens: 4, ..request.clone() };
    engine.generate(&warmup, |_| {})?;

    let mut modes = vec![("resident".to_string(), "all".to_string(), EvictionPolicy::Lru)];
    for budget in &args.vram_budgets {
        for policy in &args.expert_policies {
            modes.push(("offload".into(), budget.clone(), policy.parse()?));
        }
    }
    let mut reports: Vec<ModeReport> = Vec::new();
    let mut resident_decode = None;
    for (mode, budget, policy) in modes {
        let budget_value: VramBudget = budget.parse()?;
        engine.model.set_expert_options(ExpertOptions { budget: budget_value, policy, kv_tokens: None })?;
        if mode == "offload" {
            // Every offloaded mode starts cold, as a fresh process would.
            engine.model.experts().clear();
        }
        let output = engine.generate(&request, |_| {}).with_context(|| format!("bench mode {mode} {budget}"))?;
        let plan = engine.model.experts().plan().clone();
        let s: &GenerateStats = &output.stats;
        let decode_tokens = s.new_tokens.saturating_sub(1).max(1) as f64;
        let d = s.decode_experts;
        let resident = *resident_decode.get_or_insert(s.decode_tokens_per_second);
        reports.push(ModeReport {
            mode,
            vram_budget: budget,
            policy,
            slots: plan.slots,
            total_experts: plan.total_experts,
            gpu_bytes: plan.gpu_bytes(),
            prefill_tokens_per_second: s.prefill_tokens_per_second,
            decode_tokens_per_second: s.decode_tokens_per_second,
            time_to_first_token_seconds: s.time_to_first_token_seconds,
            hit_rate: d.hit_rate(),
            misses_per_token: d.misses as f64 / decode_tokens,
            bytes_uploaded_per_token: d.bytes_uploaded as f64 / decode_tokens,
            stall_fraction: d.stall_seconds / s.decode_seconds.max(1e-9),
            decode_ratio_to_resident: s.decode_tokens_per_second / resident,
            prefill_uploaded_bytes: s.prefill_experts.bytes_uploaded,
            ids: output.ids,
        });
    }
    let exact = reports.iter().all(|r| r.ids == reports[0].ids);
    // Host-to-GPU paths at one expert's size, and at 64 MiB for the link's peak.
    let slot_bytes = engine.model.experts().plan().slot_bytes as usize;
    let mut uploads = measure_upload(&gpu, slot_bytes, 7)?;
    uploads.extend(measure_upload(&gpu, 64 << 20, 3)?);
    let report = serde_json::json!({
        "model": folder,
        "family": spec.family,
        "adapter": gpu.adapter,
        "prompt_len": prompt.len(),
        "gen_len": request.max_new_tokens,
        "greedy_tokens_identical_across_modes": exact,
        "checkpoint_bytes": opened.weights.total_bytes(),
        "peak_rss_bytes": ferry_runtime::memory::peak_rss_bytes(),
        "modes": reports,
        "uploads": uploads,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{} on {} — prompt {} tokens, {} generated",
        folder.display(),
        gpu.describe(),
        prompt.len(),
        request.max_new_tokens
    );
    println!(
        "{:<9} {:>7} {:>11} {:>6} {:>11} {:>10} {:>8} {:>12} {:>8} {:>9}",
        "mode", "budget", "policy", "slots", "prefill t/s", "decode t/s", "hit %", "MiB/token", "stall %", "vs res."
    );
    for r in &reports {
        println!(
            "{:<9} {:>7} {:>11} {:>6} {:>11.1} {:>10.2} {:>8.1} {:>12.3} {:>8.1} {:>9.2}",
            r.mode,
            r.vram_budget,
            r.policy.to_string(),
            r.slots,
            r.prefill_tokens_per_second,
            r.decode_tokens_per_second,
            100.0 * r.hit_rate,
            r.bytes_uploaded_per_token / (1024.0 * 1024.0),
            100.0 * r.stall_fraction,
            r.decode_ratio_to_resident
        );
    }
    println!("greedy tokens identical across modes: {exact}");
    for u in &uploads {
        println!(
            "upload {:<20} {:>9.2} MiB: {:>8.2} GiB/s (median of {})",
            u.method,
            u.bytes as f64 / 1048576.0,
            u.bytes_per_second / (1u64 << 30) as f64,
            u.uploads
        );
    }
    if let Some(rss) = ferry_runtime::memory::peak_rss_bytes() {
        println!(
            "peak host RSS {:.1} MiB; checkpoint {:.1} MiB",
            rss as f64 / 1048576.0,
            opened.weights.total_bytes() as f64 / 1048576.0
        );
    }
    Ok(())
}
