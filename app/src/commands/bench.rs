//! `ferry bench`: all-resident and offloaded modes measured in one run on the same prompt, so
//! their ratios are not spoiled by machine noise between runs.

use anyhow::{Context, Result};
use ferry_runtime::engine::{Engine, GenerateRequest, GenerateStats};
use ferry_runtime::experts::{
    BigLittle, EvictionPolicy, ExpertDtype, Importance, LinkModel, VramBudget, measure_upload,
};
use ferry_runtime::graph::{DenseDtype, ExpertOptions, Model, PrefetchMode};
use ferry_runtime::roofline::{DecodeBytes, ceiling_tokens_per_second, measure_memory_bandwidth};
use ferry_runtime::sampling::SamplingConfig;
use ferry_runtime::{AdapterChoice, Gpu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::args::BenchArgs;

/// One mode to measure.
#[derive(Clone)]
struct Mode {
    name: String,
    dtype: ExpertDtype,
    /// How projection matrices are stored.
    dense: DenseDtype,
    budget: String,
    policy: EvictionPolicy,
    prefetch: PrefetchMode,
    big_little: Option<BigLittle>,
    /// Emulated host-to-GPU link (None: the adapter's own speed).
    link: Option<LinkModel>,
}

/// A mode's prefetch, experts (with its importance) and expert format, for the tables.
fn label(r: &ModeReport) -> String {
    let experts = match r.importance {
        Some(i) => format!("{}:{i}", r.experts),
        None => r.experts.to_string(),
    };
    let projections = if r.dense_dtype == DenseDtype::F32 { String::new() } else { format!("/{}-proj", r.dense_dtype) };
    format!("{:?}/{experts}/{}{projections}", r.prefetch, r.expert_dtype).to_lowercase()
}

/// `--link-gbps` entry: `none` (the adapter's speed) or GB/s.
fn parse_link(text: &str) -> Result<Option<LinkModel>> {
    if text == "none" {
        return Ok(None);
    }
    let gbps: f64 = text.parse().with_context(|| format!("--link-gbps {text:?}: use none or a number of GB/s"))?;
    crate::load::link(Some(gbps))
}

/// One measured mode.
#[derive(serde::Serialize)]
struct ModeReport {
    mode: String,
    /// How routed experts were stored (f32 is exact).
    expert_dtype: ExpertDtype,
    /// How projection matrices were stored (f32 is exact).
    dense_dtype: DenseDtype,
    vram_budget: String,
    policy: EvictionPolicy,
    prefetch: PrefetchMode,
    /// "full" or "big-little".
    experts: &'static str,
    /// Big-little: its importance score; share of (token, layer) choices that were big;
    /// fallbacks per token.
    importance: Option<Importance>,
    big_share: Option<f64>,
    fallbacks_per_token: f64,
    /// Big-little with pre-gating: share of predicted big/little modes that were right, and
    /// predicted-little tokens that chose big, per token.
    mode_prediction_accuracy: Option<f64>,
    big_predicted_little_per_token: f64,
    /// Experts computed per token and MoE layer.
    experts_per_token_layer: f64,
    /// GB/s of the emulated host-to-GPU link; None: uploads as fast as this adapter takes them.
    emulated_link_gb_per_s: Option<f64>,
    slots: usize,
    total_experts: usize,
    /// GPU bytes the budget plans (resident weights, KV cache, expert slots).
    gpu_bytes: u64,
    /// GPU memory measured through wgpu's allocator after the mode ran, device-wide (every model
    /// copy alive in the process, burn's pools, staging); None where the backend keeps no report.
    gpu_memory: Option<ferry_runtime::device::GpuMemory>,
    prefill_tokens_per_second: f64,
    /// The median of `decode_tokens_per_second_runs` (the run every other figure comes from).
    decode_tokens_per_second: f64,
    /// Every round's decode tokens/s (`--rounds`).
    decode_tokens_per_second_runs: Vec<f64>,
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
    /// Experts requested by predictions, per decoded token.
    prefetched_per_token: f64,
    wasted_prefetch_bytes_per_token: f64,
    /// Per MoE layer after the first: share of real top-k choices that had been predicted.
    recall_per_layer: Vec<Option<f64>>,
    /// MoLE lookup tables, over decode steps: rows fetched, bytes read from the mapped table
    /// (page cache or disk) and bytes uploaded per token (zero for other models).
    lookup_rows_per_token: f64,
    lookup_bytes_read_per_token: f64,
    lookup_bytes_uploaded_per_token: f64,
    /// Bytes a decode step reads from GPU memory (weights, computed experts, KV cache at the
    /// middle of the generation), f32.
    decode_bytes_read_per_token: u64,
    /// Decode tokens/s if reading those bytes at the measured memory bandwidth and uploading the
    /// missed experts at the measured upload rate were all a step did.
    roofline_tokens_per_second: f64,
    /// Measured decode tokens/s over the roofline.
    roofline_fraction: f64,
    ids: Vec<u32>,
}

/// One generation of the bench request in one mode.
struct Run {
    output: ferry_runtime::engine::GenerateOutput,
    recall_per_layer: Vec<Option<f64>>,
    plan: ferry_runtime::experts::SlotPlan,
}

fn run_mode(engine: &mut Engine, mode: &Mode, request: &GenerateRequest, prefetch_extra: usize) -> Result<Run> {
    let budget: VramBudget = mode.budget.parse()?;
    engine.model.set_expert_options(ExpertOptions {
        expert_dtype: mode.dtype,
        dense_dtype: mode.dense,
        budget,
        policy: mode.policy,
        kv_tokens: None,
        prefetch: mode.prefetch,
        prefetch_extra,
        link: mode.link,
        big_little: mode.big_little,
        ..ExpertOptions::default()
    })?;
    if mode.name == "offload" {
        // Every offloaded mode starts cold, as a fresh process would.
        engine.model.experts_mut().clear();
    }
    let recall_before = engine.model.experts().recall().to_vec();
    let output =
        engine.generate(request, |_| {}).with_context(|| format!("bench mode {} {}", mode.name, mode.budget))?;
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

pub fn run(args: BenchArgs) -> Result<()> {
    // Flags are checked before the model loads and warms up.
    let links: Vec<Option<LinkModel>> = if args.link_gbps.is_empty() {
        vec![None]
    } else {
        args.link_gbps.iter().map(|g| parse_link(g)).collect::<Result<_>>()?
    };
    let folder = match &args.model {
        Some(folder) => folder.clone(),
        None => ferry_models::random_model::ensure()?,
    };
    let opened = ferry_models::open(&folder)?;
    let gpu = Gpu::open(args.adapter.parse::<AdapterChoice>()?)?;
    let spec = opened.spec.clone();
    let model = Model::load(opened.spec, &opened.weights, &gpu.device)?;
    let mut engine = Engine::new(model, None);

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
    // Shader compilation and autotuning happen per shape on first use (attention's shapes change
    // with every sequence length), so the whole request runs once before any mode is measured;
    // otherwise the first mode measured pays for all of them.
    engine.generate(&request, |_| {})?;

    let has_experts = spec.layers.contains(&ferry_runtime::spec::FfnKind::Moe);
    let mut dtypes: Vec<ExpertDtype> = vec![ExpertDtype::F32];
    let dtype_names = if args.compare {
        vec!["f16".to_string(), "int8".to_string(), "int4".to_string()]
    } else {
        args.expert_dtypes.clone()
    };
    for name in &dtype_names {
        let dtype: ExpertDtype = name.parse()?;
        if !dtypes.contains(&dtype) && has_experts {
            dtypes.push(dtype);
        }
    }
    let (prefetches, experts_modes) = if args.compare {
        (vec!["none".to_string(), "pregate".into()], vec!["full".to_string(), "big-little".into()])
    } else {
        (args.prefetch.clone(), args.experts.clone())
    };
    let budgets = match (&args.vram_budgets[..], args.compare) {
        (_, _) if !has_experts => Vec::new(),
        ([], true) => vec!["25%".to_string()],
        ([], false) => vec!["50%".to_string()],
        (given, _) => given.to_vec(),
    };
    let mut denses: Vec<DenseDtype> = Vec::new();
    for name in &args.dense_dtypes {
        let dense: DenseDtype = name.parse()?;
        if !denses.contains(&dense) {
            denses.push(dense);
        }
    }
    if denses.first() != Some(&DenseDtype::F32) {
        denses.retain(|&d| d != DenseDtype::F32);
        denses.insert(0, DenseDtype::F32);
    }
    let mut modes = vec![Mode {
        name: "resident".into(),
        dtype: ExpertDtype::F32,
        dense: DenseDtype::F32,
        budget: "all".into(),
        policy: EvictionPolicy::Lru,
        prefetch: PrefetchMode::None,
        big_little: None,
        link: None,
    }];
    for &link in &links {
        for budget in &budgets {
            for policy in &args.expert_policies {
                for prefetch in &prefetches {
                    for experts in &experts_modes {
                        // Full mode has no importance: measured once, whatever --importance lists.
                        let importances =
                            if experts == "full" { &args.importances[..1] } else { &args.importances[..] };
                        for importance in importances {
                            let big_little = crate::load::big_little(&crate::args::BigLittleArgs {
                                experts: experts.clone(),
                                importance: importance.clone(),
                                big_fraction: args.big_fraction,
                                big_fallback: "fetch".into(),
                            })?;
                            modes.push(Mode {
                                name: "offload".into(),
                                dtype: ExpertDtype::F32,
                                dense: DenseDtype::F32,
                                budget: budget.clone(),
                                policy: policy.parse()?,
                                prefetch: prefetch.parse()?,
                                big_little,
                                link,
                            });
                        }
                    }
                }
            }
        }
    }
    let moe_layers = spec.layers.iter().filter(|l| matches!(l, ferry_runtime::spec::FfnKind::Moe)).count().max(1);
    let mut reports: Vec<ModeReport> = Vec::new();
    let mut resident_decode = None;
    // Each quantised expert format and f16 projections repeat every mode (all-resident
    // included) on their own copy of the model; the first mode, all-resident f32, is the baseline
    // of every ratio. Modes of one format share the copy, and `rounds` passes over them
    // interleave the repeats, so a burst of machine noise hits every mode rather than one.
    let groups: Vec<Vec<Mode>> = denses
        .iter()
        .flat_map(|&dense| dtypes.iter().map(move |&dtype| (dense, dtype)))
        .map(|(dense, dtype)| modes.iter().map(|m| Mode { dtype, dense, ..m.clone() }).collect())
        .collect();
    let mut copy: Option<Engine> = None;
    for group in groups {
        let (dtype, dense) = (group[0].dtype, group[0].dense);
        if (dtype, dense) != (ExpertDtype::F32, DenseDtype::F32) {
            // Drop the previous copy before uploading the next.
            drop(copy.take());
            let opened = ferry_models::open(&folder)?;
            let options = ExpertOptions { expert_dtype: dtype, dense_dtype: dense, ..ExpertOptions::default() };
            let mut loaded = Engine::new(Model::load_with(opened.spec, &opened.weights, &gpu.device, options)?, None);
            loaded.generate(&request, |_| {})?;
            copy = Some(loaded);
        }
        let engine = copy.as_mut().unwrap_or(&mut engine);
        let mut runs: Vec<Vec<Run>> = (0..group.len()).map(|_| Vec::new()).collect();
        for _ in 0..args.rounds {
            for (mode, runs) in group.iter().zip(&mut runs) {
                runs.push(run_mode(engine, mode, &request, args.prefetch_extra)?);
            }
        }
        for (mode, mut runs) in group.into_iter().zip(runs) {
            let decode_runs: Vec<f64> = runs.iter().map(|r| r.output.stats.decode_tokens_per_second).collect();
            runs.sort_by(|a, b| {
                a.output.stats.decode_tokens_per_second.total_cmp(&b.output.stats.decode_tokens_per_second)
            });
            let Run { output, recall_per_layer, plan } = runs.swap_remove(runs.len() / 2);
            let Mode { name: mode, dtype, dense, budget, policy, prefetch, big_little, link: mode_link } = mode;
            let s: &GenerateStats = &output.stats;
            let decode_tokens = s.new_tokens.saturating_sub(1).max(1) as f64;
            let d = s.decode_experts;
            let resident = *resident_decode.get_or_insert(s.decode_tokens_per_second);
            reports.push(ModeReport {
                mode,
                expert_dtype: dtype,
                dense_dtype: dense,
                vram_budget: budget,
                policy,
                prefetch,
                experts: if big_little.is_some() { "big-little" } else { "full" },
                importance: big_little.map(|b| b.importance),
                big_share: big_little.map(|_| d.big as f64 / (d.big + d.little).max(1) as f64),
                fallbacks_per_token: d.fallbacks as f64 / decode_tokens,
                mode_prediction_accuracy: d.mode_prediction_accuracy(),
                big_predicted_little_per_token: d.big_predicted_little as f64 / decode_tokens,
                experts_per_token_layer: (d.hits + d.misses) as f64 / decode_tokens / moe_layers as f64,
                emulated_link_gb_per_s: mode_link.map(|l| l.bytes_per_second / 1e9),
                slots: plan.slots,
                total_experts: plan.total_experts,
                gpu_bytes: plan.gpu_bytes(),
                gpu_memory: gpu.memory(),
                prefill_tokens_per_second: s.prefill_tokens_per_second,
                decode_tokens_per_second: s.decode_tokens_per_second,
                decode_tokens_per_second_runs: decode_runs,
                time_to_first_token_seconds: s.time_to_first_token_seconds,
                hit_rate: d.hit_rate(),
                misses_per_token: d.misses as f64 / decode_tokens,
                bytes_uploaded_per_token: d.bytes_uploaded as f64 / decode_tokens,
                stall_fraction: d.stall_seconds / s.decode_seconds.max(1e-9),
                decode_ratio_to_resident: s.decode_tokens_per_second / resident,
                prefill_uploaded_bytes: s.prefill_experts.bytes_uploaded,
                prefetched_per_token: d.prefetched as f64 / decode_tokens,
                wasted_prefetch_bytes_per_token: d.wasted_prefetch_bytes as f64 / decode_tokens,
                recall_per_layer,
                lookup_rows_per_token: s.decode_lookup.rows_fetched as f64 / decode_tokens,
                lookup_bytes_read_per_token: s.decode_lookup.bytes_read as f64 / decode_tokens,
                lookup_bytes_uploaded_per_token: s.decode_lookup.bytes_uploaded as f64 / decode_tokens,
                decode_bytes_read_per_token: 0,
                roofline_tokens_per_second: 0.0,
                roofline_fraction: 0.0,
                ids: output.ids,
            });
        }
    }
    let exact = reports
        .iter()
        .filter(|r| r.experts == "full" && r.expert_dtype == ExpertDtype::F32 && r.dense_dtype == DenseDtype::F32)
        .all(|r| r.ids == reports[0].ids);
    // Host-to-GPU paths at one expert's size, and at 64 MiB for the link's peak.
    let slot_bytes = engine.model.experts().plan().slot_bytes as usize;
    let mut uploads = measure_upload(&gpu, slot_bytes, 7)?;
    uploads.extend(measure_upload(&gpu, 64 << 20, 3)?);
    // The roofline: memory bandwidth over the largest buffer one binding takes (at most 256 MiB),
    // and the upload rate of the path the expert cache uses (burn's from_data).
    let stream = gpu.adapter.max_storage_buffer_binding_size.min(256 << 20) as usize;
    let memory = measure_memory_bandwidth(&gpu, stream, 5)?;
    let upload_rate = uploads
        .iter()
        .filter(|u| u.method == "burn_from_data")
        .map(|u| u.bytes_per_second)
        .fold(f64::MIN_POSITIVE, f64::max);
    let middle = prompt.len() + request.max_new_tokens / 2;
    for r in &mut reports {
        let read = DecodeBytes::of(&spec, middle, r.experts_per_token_layer, r.expert_dtype, r.dense_dtype).total();
        r.decode_bytes_read_per_token = read;
        r.roofline_tokens_per_second =
            ceiling_tokens_per_second(read, memory.bytes_per_second, r.bytes_uploaded_per_token, upload_rate);
        r.roofline_fraction = r.decode_tokens_per_second / r.roofline_tokens_per_second;
    }
    let report = serde_json::json!({
        "model": folder,
        "family": spec.family,
        "adapter": gpu.adapter,
        "prompt_len": prompt.len(),
        "gen_len": request.max_new_tokens,
        "link": links.iter().map(|link| match link {
            Some(l) => format!("emulated {} GB/s host-to-GPU link", l.bytes_per_second / 1e9),
            None => "not emulated: uploads run at this adapter's speed".to_string(),
        }).collect::<Vec<_>>(),
        "greedy_tokens_identical_across_exact_modes": exact,
        "checkpoint_bytes": opened.weights.total_bytes(),
        "lookup_table": engine.model.lookup_table(),
        "peak_rss_bytes": ferry_runtime::memory::peak_rss_bytes(),
        "modes": reports,
        "uploads": uploads,
        "memory_bandwidth": memory,
        "upload_bytes_per_second": upload_rate,
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
    if links.iter().any(Option::is_some) {
        println!("offloaded modes with a link in GB/s run over an EMULATED host-to-GPU link");
    }
    println!(
        "{:<9} {:>5} {:>7} {:>11} {:>36} {:>6} {:>11} {:>10} {:>8} {:>12} {:>8} {:>9} {:>7}",
        "mode",
        "link",
        "budget",
        "policy",
        "prefetch/experts/dtype",
        "slots",
        "prefill t/s",
        "decode t/s",
        "hit %",
        "MiB/token",
        "stall %",
        "vs res.",
        "recall"
    );
    for r in &reports {
        let recalls: Vec<f64> = r.recall_per_layer.iter().flatten().copied().collect();
        let recall = if recalls.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * recalls.iter().sum::<f64>() / recalls.len() as f64)
        };
        println!(
            "{:<9} {:>5} {:>7} {:>11} {:>36} {:>6} {:>11.1} {:>10.2} {:>8.1} {:>12.3} {:>8.1} {:>9.2} {:>7}",
            r.mode,
            r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
            r.vram_budget,
            r.policy.to_string(),
            label(r),
            r.slots,
            r.prefill_tokens_per_second,
            r.decode_tokens_per_second,
            100.0 * r.hit_rate,
            r.bytes_uploaded_per_token / (1024.0 * 1024.0),
            100.0 * r.stall_fraction,
            r.decode_ratio_to_resident,
            recall
        );
    }
    println!("greedy tokens identical across exact (full) modes: {exact}");
    if let Some(peak) = reports.iter().filter_map(|r| r.gpu_memory).max_by_key(|m| m.reserved_bytes) {
        println!(
            "GPU memory (wgpu allocator, device-wide, largest after any mode): {:.1} MiB allocated, {:.1} MiB reserved",
            peak.allocated_bytes as f64 / 1048576.0,
            peak.reserved_bytes as f64 / 1048576.0
        );
    }
    println!(
        "roofline: memory {:.1} GiB/s (elementwise over {} MiB), uploads {:.2} GiB/s (burn from_data)",
        memory.bytes_per_second / (1u64 << 30) as f64,
        memory.bytes >> 20,
        upload_rate / (1u64 << 30) as f64
    );
    for r in &reports {
        println!(
            "roofline {:<9} {:>5} {:>7} {:>36}: reads {:>8.2} MiB/token, uploads {:>7.3} MiB/token -> ceiling {:>9.1} tok/s, achieved {:>5.1}%",
            r.mode,
            r.emulated_link_gb_per_s.map_or("-".to_string(), |g| format!("{g}")),
            r.vram_budget,
            label(r),
            r.decode_bytes_read_per_token as f64 / 1048576.0,
            r.bytes_uploaded_per_token / 1048576.0,
            r.roofline_tokens_per_second,
            100.0 * r.roofline_fraction
        );
    }
    if let (Some(table), Some(r)) = (engine.model.lookup_table(), reports.first()) {
        println!(
            "lookup table: {:.2} MiB ({:?}); per decoded token {:.1} rows, {:.1} KiB read, {:.1} KiB uploaded",
            table.file_bytes() as f64 / 1048576.0,
            table.dtype,
            r.lookup_rows_per_token,
            r.lookup_bytes_read_per_token / 1024.0,
            r.lookup_bytes_uploaded_per_token / 1024.0
        );
    }
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
