//! `ferry bench`: all-resident and offloaded modes measured in one run on the same prompt, so
//! their ratios are not spoiled by machine noise between runs. Three steps: `plan` (which
//! modes), `measure` (interleaved rounds per format), `report` (median runs, roofline, tables).

mod curve;
mod measure;
mod plan;
mod report;
mod streams;

use anyhow::Result;
use ferry_runtime::Gpu;
use ferry_runtime::engine::{Engine, GenerateRequest};
use ferry_runtime::graph::Model;
use ferry_runtime::measure::measure_upload;

use ferry_runtime::measure::roofline::measure_memory_bandwidth;
use ferry_runtime::options::{ExpertOptions, LinkModel, UploadPath, VramBudget};
use ferry_runtime::sampling::SamplingConfig;
use ferry_runtime::spec::{FfnKind, ModelSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::args::BenchArgs;
use report::{ModeReport, Summary};

pub fn run(args: BenchArgs) -> Result<()> {
    let folder = match &args.model {
        Some(folder) => ferry_models::hub::resolve(folder)?,
        None => ferry_models::random_model::ensure()?,
    };
    let opened = ferry_models::open(&folder)?;
    let spec = opened.spec.clone();
    // Flags are checked before the model loads and warms up.
    let plan = plan::plan(&args, &spec)?;
    let links = plan.links.clone();
    let gpu = Gpu::open(args.adapter)?;
    // What every measurement below loads its model with.
    let base = ExpertOptions {
        decode_split: args.decode_split,
        upload: args.upload,
        cpu_threads: args.cpu_threads,
        ..Default::default()
    };
    if !args.prefill_curve.is_empty() {
        let options = ExpertOptions { prefill_chunk: args.prefill_chunk, ..base };
        let model = Model::load_with(opened.spec, &opened.weights, &gpu.device, options)?;
        let mut engine = Engine::new(model, None);
        let points = curve::measure(&mut engine, &spec, &args.prefill_curve, args.prefill_chunk, args.seed)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "folder": folder, "adapter": gpu.describe(), "prefill_chunk": args.prefill_chunk, "prefill_curve": points })
            );
        } else {
            curve::print(&points);
        }
        return Ok(());
    }
    if !args.streams.is_empty() {
        // The first budget, policy and link asked for (default: 25% over an emulated 16 GB/s).
        let options = ExpertOptions {
            budget: args.vram_budgets.first().copied().unwrap_or(VramBudget::FractionOfExperts(0.25)),
            policy: args.expert_policies.first().copied().unwrap_or_default(),
            link: match args.link_gbps.first() {
                Some(choice) => choice.0,
                None => Some(LinkModel::checked(16.0)?),
            },
            prefill_chunk: args.prefill_chunk,
            ..base
        };
        let shape = (args.prompt_len.max(1), args.gen_len.max(1), args.seed);
        let budget = options.budget;
        let link =
            options.link.map_or("adapter's own".into(), |l| format!("{} GB/s (emulated)", l.bytes_per_second / 1e9));
        if !args.json {
            let counts = args.streams.iter().map(usize::to_string).collect::<Vec<_>>().join("/");
            println!(
                "{counts} requests of {} prompt + {} new tokens at once, budget {budget}, link {link}:",
                shape.0, shape.1
            );
            streams::print_header();
        }
        let points = streams::measure(&spec, &opened.weights, &gpu, options, &args.streams, shape, |p| {
            if !args.json {
                streams::print(p);
            }
        })?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "folder": folder, "adapter": gpu.describe(), "budget": budget.to_string(),
                    "policy": options.policy.to_string(), "link_gbps": options.link.map(|l| l.bytes_per_second / 1e9),
                    "prompt_len": shape.0, "gen_len": shape.1, "streams": points })
            );
        }
        return Ok(());
    }
    let base = ExpertOptions { prefetch_extra: args.prefetch_extra, pregate_routing: args.pregate_routing, ..base };
    let model = Model::load_with(opened.spec, &opened.weights, &gpu.device, base)?;
    let mut engine = Engine::new(model, None);

    let prompt = random_prompt(&spec, args.prompt_len.max(1), args.seed);
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

    let measured = measure::measure(plan, &mut engine, &folder, &gpu, &request, args.rounds, base)?;
    let moe_layers = spec.layers.iter().filter(|l| matches!(l, FfnKind::Moe)).count().max(1);
    let mut resident = None;
    let mut reports: Vec<ModeReport> =
        measured.into_iter().map(|m| ModeReport::new(m, &mut resident, moe_layers, &gpu)).collect();

    // Host-to-GPU paths at one expert's size, and at 64 MiB for the link's peak.
    let slot_bytes = engine.model.experts().plan().slot_bytes as usize;
    let mut uploads = measure_upload(&gpu, slot_bytes, 7)?;
    uploads.extend(measure_upload(&gpu, 64 << 20, 3)?);
    // The roofline: memory bandwidth over the largest buffer one binding takes (at most 256 MiB),
    // and the upload rate of the path the expert cache uses: the mapped staging ring where
    // `--upload` resolves to it (a GPU under `auto`), else burn's from_data.
    let stream = gpu.adapter.max_storage_buffer_binding_size.min(256 << 20) as usize;
    let memory = measure_memory_bandwidth(&gpu, stream, 5)?;
    let staged = match args.upload {
        UploadPath::Staging => true,
        UploadPath::Burn => false,
        UploadPath::Auto => gpu.adapter.device_type != "Cpu",
    };
    let upload_method = if staged { "mapped_staging" } else { "burn_from_data" };
    let upload_rate = uploads
        .iter()
        .filter(|u| u.method == upload_method)
        .map(|u| u.bytes_per_second)
        .fold(f64::MIN_POSITIVE, f64::max);
    let middle = prompt.len() + request.max_new_tokens / 2;
    for r in &mut reports {
        r.set_roofline(&spec, middle, &memory, upload_rate);
    }
    let summary = Summary {
        folder: &folder,
        spec: &spec,
        gpu: &gpu,
        prompt_len: prompt.len(),
        gen_len: request.max_new_tokens,
        links: &links,
        checkpoint_bytes: opened.weights.total_bytes(),
        lookup_table: engine.model.lookup_table(),
        reports: &reports,
        uploads: &uploads,
        decode_split: args.decode_split,
        upload: args.upload,
        memory: &memory,
        upload_rate,
        upload_method,
    };
    if args.json {
        println!("{}", summary.json());
    } else {
        summary.print();
    }
    Ok(())
}

/// `n` random token ids from `seed`, none of them an end-of-sequence token.
fn random_prompt(spec: &ModelSpec, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            loop {
                let id = rng.random_range(0..spec.vocab_size as u32);
                if !spec.eos_token_ids.contains(&id) {
                    break id;
                }
            }
        })
        .collect()
}
