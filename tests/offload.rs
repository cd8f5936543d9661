//! The expert manager: offloaded output equals all-resident output bit for bit under any budget
//! and exact policy, the cache counts what it does, and bad budgets are clear errors.

use std::collections::HashSet;

use ferry_runtime::engine::{Engine, GenerateRequest};
use ferry_runtime::experts::ExpertStats;
use ferry_runtime::graph::{ForwardOutput, LogitsFor, Model};
use ferry_runtime::options::ExpertOptions;
use ferry_runtime::options::{
    DecodeSplit, EvictionPolicy, ExpertDtype, MissPolicy, PrefetchMode, Routing, UploadPath, VramBudget,
};
use ferry_runtime::sampling::SamplingConfig;

use crate::support::{FAMILIES, fixture, gpu, greedy, reference};

fn load(family: &str, budget: VramBudget, policy: EvictionPolicy) -> Model {
    let opened = ferry_models::open(&fixture(family)).unwrap();
    Model::load_with(
        opened.spec,
        &opened.weights,
        &gpu().device,
        ExpertOptions { budget, policy, ..Default::default() },
    )
    .unwrap()
}

fn prompt_forward(model: &mut Model, ids: &[u32]) -> ForwardOutput {
    let mut cache = model.new_cache(ids.len()).unwrap();
    model.forward(ids, &mut cache, LogitsFor::All).unwrap()
}

/// Both upload paths (Ferry's mapped staging ring, the default; burn's from_data) put the same
/// bytes in the slots: offloaded logits equal all-resident ones either way, f32 and bf16.
#[test]
fn staged_and_burn_uploads_compute_the_same_bits() {
    for (family, dtype) in
        [("mixtral", ExpertDtype::F32), ("qwen3_moe", ExpertDtype::F32), ("olmoe", ExpertDtype::Bf16)]
    {
        let reference = reference(family);
        let run = |budget, upload| {
            let opened = ferry_models::open(&fixture(family)).unwrap();
            let options = ExpertOptions { budget, upload, expert_dtype: dtype, ..Default::default() };
            let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
            let logits = stepwise_logits(&mut model, &reference.input_ids[..8.min(reference.input_ids.len())]);
            (logits, model.experts().staged_uploads(), model.experts().stats().misses)
        };
        let (resident, staged_at_load, _) = run(VramBudget::All, UploadPath::Staging);
        assert!(staged_at_load > 0, "{family}: the resident experts should load through the staging ring");
        // auto stages on a GPU and leaves a CPU adapter (lavapipe) to burn.
        let cpu = gpu().adapter.device_type == "Cpu";
        for upload in [UploadPath::Staging, UploadPath::Burn, UploadPath::Auto] {
            let (logits, staged, misses) = run(TOP_K_SLOTS, upload);
            assert!(misses > 0, "{family}");
            let staging = upload == UploadPath::Staging || (upload == UploadPath::Auto && !cpu);
            assert_eq!(staged > 0, staging, "{family} {upload}: {staged} staged uploads");
            assert_eq!(logits, resident, "{family} {upload}: offloaded logits differ from all-resident");
        }
    }
}

/// Prefetched experts travel through the staging ring filled by the upload thread straight from
/// the memory map (f32 slots over an F32 checkpoint, and converted bf16): the compute thread only
/// records their copies, and the logits still equal all-resident ones bit for bit.
#[test]
fn the_upload_thread_fills_the_staging_ring_with_the_same_bits() {
    for (family, dtype) in [("mixtral", ExpertDtype::F32), ("olmoe", ExpertDtype::Bf16)] {
        let reference = reference(family);
        let ids = &reference.input_ids[..10.min(reference.input_ids.len())];
        let run = |budget, prefetch| {
            let opened = ferry_models::open(&fixture(family)).unwrap();
            let options = ExpertOptions {
                budget,
                prefetch,
                upload: UploadPath::Staging,
                expert_dtype: dtype,
                ..Default::default()
            };
            let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
            (stepwise_logits(&mut model, ids), model.experts().stats())
        };
        let (resident, _) = run(VramBudget::All, PrefetchMode::None);
        let (logits, stats) = run(VramBudget::FractionOfExperts(0.5), PrefetchMode::Pregate);
        assert!(stats.prefetched > 0, "{family}: nothing was prefetched");
        assert!(stats.staged_by_thread > 0, "{family}: no prefetch went through a thread-filled staging buffer");
        assert!(stats.staged_by_thread <= stats.prefetched, "{family}: {stats:?}");
        assert_eq!(logits, resident, "{family}: thread-staged logits differ from all-resident");
    }
}

/// The logits of `ids` fed one per forward pass.
fn stepwise_logits(model: &mut Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(ids.len()).unwrap();
    ids.iter().map(|&id| model.forward(&[id], &mut cache, LogitsFor::All).unwrap().logits.concat()).collect()
}

/// The smallest budget there is: one layer's top-k slots, so every layer evicts.
const TOP_K_SLOTS: VramBudget = VramBudget::FractionOfExperts(2.0 / 16.0);

#[test]
fn offloaded_logits_and_tokens_equal_all_resident_bit_for_bit() {
    for family in FAMILIES {
        let reference = reference(family);
        let mut resident = load(family, VramBudget::All, EvictionPolicy::Lru);
        let expected = prompt_forward(&mut resident, &reference.input_ids);
        let expected_tokens = greedy(&mut Engine::new(resident, None), &reference.greedy.prompt_ids, 12);
        for policy in [EvictionPolicy::Lru, EvictionPolicy::Lfu, EvictionPolicy::LfuPinned] {
            for budget in [TOP_K_SLOTS, VramBudget::FractionOfExperts(0.5)] {
                let mut model = load(family, budget, policy);
                let out = prompt_forward(&mut model, &reference.input_ids);
                assert_eq!(
                    out.logits, expected.logits,
                    "{family} {policy} {budget:?}: logits differ from all-resident"
                );
                assert_eq!(out.routing, expected.routing, "{family} {policy} {budget:?}");
                let stats = model.experts().stats();
                assert!(stats.misses > 0, "{family}: an offloaded cold cache must miss");
                assert_eq!(
                    greedy(&mut Engine::new(model, None), &reference.greedy.prompt_ids, 12),
                    expected_tokens,
                    "{family} {policy} {budget:?}"
                );
            }
        }
    }
}

/// Dot products split among units as on a GPU (`--decode-split 64`, forced on lavapipe, where
/// `auto` keeps them whole): offloaded still equals resident bit for bit, and greedy decoding
/// still matches transformers' (the fixtures keep greedy margins above 1e-2).
#[test]
fn split_dot_products_keep_offloaded_equal_to_resident() {
    let mut changed_rounding = false;
    for family in FAMILIES {
        let reference = reference(family);
        let opened = || ferry_models::open(&fixture(family)).unwrap();
        let load_split = |budget, split| {
            let options = ExpertOptions { budget, decode_split: split, ..Default::default() };
            let opened = opened();
            Engine::new(Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap(), None)
        };
        let load = |budget| load_split(budget, DecodeSplit::Ways(64));
        let n = reference.greedy.new_ids.len();
        let mut resident = load(VramBudget::All);
        let tokens = greedy(&mut resident, &reference.greedy.prompt_ids, n);
        assert_eq!(tokens, reference.greedy.new_ids, "{family}: split greedy tokens differ from transformers");
        let mut offloaded = load(TOP_K_SLOTS);
        assert_eq!(greedy(&mut offloaded, &reference.greedy.prompt_ids, n), tokens, "{family}: split, offloaded");
        // One token per pass, as a decode step runs: the split matrix-vector kernels too.
        let ids = &reference.input_ids[..reference.input_ids.len().min(8)];
        let expected = stepwise_logits(&mut resident.model, ids);
        assert_eq!(stepwise_logits(&mut offloaded.model, ids), expected, "{family}: split decode logits");
        assert!(offloaded.model.experts().stats().misses > 0, "{family}");
        let whole = stepwise_logits(&mut load_split(VramBudget::All, DecodeSplit::Ways(1)).model, ids);
        changed_rounding |= whole != expected;
        // auto is the whole shape on a CPU adapter (lavapipe, where a split is slower) and the
        // full split on a GPU.
        let auto = stepwise_logits(&mut load_split(VramBudget::All, DecodeSplit::Auto).model, ids);
        let cpu = gpu().adapter.device_type == "Cpu";
        assert!(auto == if cpu { whole } else { expected }, "{family}: auto on a CPU adapter: {cpu}");
    }
    // The flag reaches the kernels: split sums round differently somewhere.
    assert!(changed_rounding, "--decode-split 64 computed what whole dot products compute, bit for bit");
}

/// Largest difference between two sets of logits over the largest magnitude of `expected`.
fn relative_difference(got: &[Vec<f32>], expected: &[Vec<f32>]) -> f32 {
    let scale = expected.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().flatten().zip(expected.iter().flatten()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst.is_finite(), "non-finite logits");
    worst / scale
}

/// `--miss-policy cpu` (every routed expert on the host under `--vram-budget 0%`; at the top-k
/// budget the first experts used fill the slots and the rest run on the host) and `auto`, on
/// every family: decode logits stay within float rounding of all-resident ones, greedy tokens
/// equal transformers', and the host really computed experts.
#[test]
fn host_computed_misses_stay_within_rounding_of_resident_on_every_family() {
    for family in FAMILIES {
        let reference = reference(family);
        let load = |budget, miss_policy| {
            let options = ExpertOptions { budget, miss_policy, cpu_threads: Some(2), ..Default::default() };
            let opened = ferry_models::open(&fixture(family)).unwrap();
            Engine::new(Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap(), None)
        };
        let ids = &reference.input_ids[..reference.input_ids.len().min(8)];
        let resident = stepwise_logits(&mut load(VramBudget::All, MissPolicy::Upload).model, ids);
        let n = reference.greedy.new_ids.len();
        for (budget, miss) in [
            (VramBudget::FractionOfExperts(0.0), MissPolicy::Cpu),
            (TOP_K_SLOTS, MissPolicy::Cpu),
            (TOP_K_SLOTS, MissPolicy::Auto),
        ] {
            let mut engine = load(budget, miss);
            let logits = stepwise_logits(&mut engine.model, ids);
            let difference = relative_difference(&logits, &resident);
            eprintln!("{family} {budget} {miss}: relative logit difference {difference:.2e}");
            assert!(difference < 1e-4, "{family} {budget} {miss}: {difference}");
            let stats = engine.model.experts().stats();
            assert!(stats.host_computed > 0 && stats.host_seconds > 0.0, "{family} {budget} {miss}: {stats:?}");
            if budget == VramBudget::FractionOfExperts(0.0) {
                assert_eq!((stats.hits, stats.bytes_uploaded), (0, 0), "{family}: nothing is uploaded at 0%");
            }
            let tokens = greedy(&mut engine, &reference.greedy.prompt_ids, n);
            assert_eq!(tokens, reference.greedy.new_ids, "{family} {budget} {miss}: greedy tokens");
        }
    }
}

/// Every stored format computed on the host matches the GPU kernel on the same format within
/// float rounding: the host reads bf16 words, f16-rounded f32, packed integer codes and MXFP4
/// codes as the slots hold them (GPT-OSS: its biases and clamped activation too).
#[test]
fn host_computed_misses_match_the_gpu_in_every_expert_format() {
    for (family, dtypes) in [
        ("olmoe", &[ExpertDtype::Bf16, ExpertDtype::Int8, ExpertDtype::Int4, ExpertDtype::Int3, ExpertDtype::Int2][..]),
        ("gpt_oss", &[ExpertDtype::F32, ExpertDtype::Mxfp4][..]),
    ] {
        let reference = reference(family);
        let ids = &reference.input_ids[..reference.input_ids.len().min(6)];
        for &expert_dtype in dtypes {
            let load = |budget, miss_policy| {
                let options = ExpertOptions { budget, miss_policy, expert_dtype, ..Default::default() };
                let opened = ferry_models::open(&fixture(family)).unwrap();
                Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
            };
            let gpu_logits = stepwise_logits(&mut load(VramBudget::All, MissPolicy::Upload), ids);
            let mut host = load(VramBudget::FractionOfExperts(0.0), MissPolicy::Cpu);
            let difference = relative_difference(&stepwise_logits(&mut host, ids), &gpu_logits);
            eprintln!("{family} {expert_dtype}: relative logit difference {difference:.2e}");
            assert!(difference < 1e-4, "{family} {expert_dtype}: {difference}");
            assert!(host.experts().stats().host_computed > 0, "{family} {expert_dtype}");
        }
    }
}

#[test]
fn experts_spread_over_many_slot_pages_give_the_same_logits() {
    // One slot per page: every layer's experts come from several buffers and launches; the LM
    // head, split by the same buffer limit, reads back block by block, and the attention
    // projections run in blocks of output columns.
    for family in ["mixtral", "qwen3_moe"] {
        let reference = reference(family);
        let expected = prompt_forward(&mut load(family, VramBudget::All, EvictionPolicy::Lru), &reference.input_ids);
        let ids = &reference.input_ids[..4];
        let expected_steps = stepwise_logits(&mut load(family, VramBudget::All, EvictionPolicy::Lru), ids);
        for budget in [VramBudget::All, TOP_K_SLOTS] {
            let opened = ferry_models::open(&fixture(family)).unwrap();
            let projection = (opened.spec.hidden_size * opened.spec.moe.expert_intermediate_size * 4) as u64;
            let options = ExpertOptions { budget, page_bytes: Some(projection), ..Default::default() };
            let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
            // The same limit splits the LM head into blocks of 32 rows.
            assert_eq!(model.lm_head_blocks(), 12, "{family}");
            let out = prompt_forward(&mut model, &reference.input_ids);
            assert_eq!(out.logits, expected.logits, "{family} {budget:?}: logits differ with one slot per page");
            // Decode steps too: resident ones build one table per page on the device.
            let steps = stepwise_logits(&mut model, ids);
            assert_eq!(steps, expected_steps, "{family} {budget:?}: decode logits differ with one slot per page");
        }
    }
}

/// A page limit below one expert projection (as Mixtral-8x7B's 224 MiB f32 projections against
/// a 128 MiB binding): f32 and f16 projections are split by output rows into 2 or 4 buffers, and
/// logits and greedy tokens keep their bits, resident and offloaded. Packed formats, which are
/// not split, say so.
#[test]
fn projections_larger_than_a_buffer_are_split_and_change_no_bit() {
    for family in ["mixtral", "olmoe"] {
        let reference = reference(family);
        let opened = ferry_models::open(&fixture(family)).unwrap();
        let projection = (opened.spec.hidden_size * opened.spec.moe.expert_intermediate_size * 4) as u64;
        for budget in [VramBudget::All, TOP_K_SLOTS] {
            let whole = ExpertOptions { budget, ..Default::default() };
            let mut model = Model::load_with(opened.spec.clone(), &opened.weights, &gpu().device, whole).unwrap();
            let expected = prompt_forward(&mut model, &reference.input_ids);
            let expected_tokens = greedy(&mut Engine::new(model, None), &reference.greedy.prompt_ids, 6);
            for parts in [2, 4] {
                let options = ExpertOptions { page_bytes: Some(projection / parts), ..whole };
                let mut model = Model::load_with(opened.spec.clone(), &opened.weights, &gpu().device, options).unwrap();
                let out = prompt_forward(&mut model, &reference.input_ids);
                assert!(out.logits == expected.logits, "{family} {budget:?}: {parts} parts changed the logits");
                let tokens = greedy(&mut Engine::new(model, None), &reference.greedy.prompt_ids, 6);
                assert_eq!(tokens, expected_tokens, "{family} {budget:?} {parts} parts");
            }
        }
        let options = ExpertOptions {
            page_bytes: Some(projection / 8),
            expert_dtype: ferry_runtime::options::ExpertDtype::Int8,
            ..Default::default()
        };
        let err =
            Model::load_with(opened.spec.clone(), &opened.weights, &gpu().device, options).err().expect("refused");
        assert!(err.to_string().contains("this format is not"), "{err}");
    }
}

#[test]
fn a_top_k_budget_evicts_in_every_moe_layer_and_counts_every_byte() {
    let reference = reference("mixtral");
    let mut model = load("mixtral", TOP_K_SLOTS, EvictionPolicy::Lru);
    assert_eq!(model.experts().plan().slots, 2);
    let out = prompt_forward(&mut model, &reference.input_ids);
    let stats = model.experts().stats();
    let plan = model.experts().plan().clone();
    // Every layer needs more than two experts for this prompt, so each one forces evictions.
    for (layer, routes) in out.routing.iter().enumerate() {
        let unique: HashSet<u32> = routes.iter().flatten().copied().collect();
        assert!(unique.len() > 2, "layer {layer} uses only {unique:?}");
    }
    assert_eq!(stats.bytes_uploaded, stats.misses * plan.slot_bytes);
    assert_eq!(stats.evictions, stats.misses - 2, "the cache fills two slots, then every miss evicts");
    assert!(model.experts().resident_per_layer().iter().sum::<usize>() <= 2);
}

#[test]
fn prefill_uploads_each_needed_expert_once_per_layer() {
    let reference = reference("qwen2_moe");
    for budget in [TOP_K_SLOTS, VramBudget::FractionOfExperts(0.5), VramBudget::FractionOfExperts(0.75)] {
        let mut model = load("qwen2_moe", budget, EvictionPolicy::Lru);
        let out = prompt_forward(&mut model, &reference.input_ids);
        let stats: ExpertStats = model.experts().stats();
        let unique: u64 =
            out.routing.iter().map(|routes| routes.iter().flatten().collect::<HashSet<_>>().len() as u64).sum();
        let uses: u64 = out.routing.iter().flatten().map(|r| r.len() as u64).sum();
        assert_eq!(stats.misses, unique, "{budget:?}: one upload per expert and layer");
        assert_eq!(stats.hits + stats.misses, unique, "{budget:?}: one fetch per expert and layer, {uses} uses");
    }
}

#[test]
fn lru_evicts_the_least_recently_used_and_lfu_the_least_used() {
    let fetch = |model: &mut Model, experts: &[usize]| {
        for &e in experts {
            model.experts_mut().fetch(0, e).unwrap();
        }
    };
    let mut lru = load("olmoe", TOP_K_SLOTS, EvictionPolicy::Lru);
    fetch(&mut lru, &[1, 1, 1, 2, 3]); // 1 is used most but least recently
    assert!(!lru.experts().is_resident(0, 1) && lru.experts().is_resident(0, 2) && lru.experts().is_resident(0, 3));

    let mut lfu = load("olmoe", TOP_K_SLOTS, EvictionPolicy::Lfu);
    fetch(&mut lfu, &[1, 1, 1, 2, 3]);
    assert!(lfu.experts().is_resident(0, 1) && !lfu.experts().is_resident(0, 2) && lfu.experts().is_resident(0, 3));
}

#[test]
fn lfu_pinned_keeps_the_prompts_most_used_experts() {
    let reference = reference("olmoe");
    let mut model = load("olmoe", VramBudget::FractionOfExperts(0.75), EvictionPolicy::LfuPinned);
    prompt_forward(&mut model, &reference.input_ids);
    let pinned = model.experts().pinned();
    // 12 slots, 2 kept free for one layer's top-k: half of the other 10 pinned, 2 per MoE layer.
    assert_eq!(pinned.len(), 4, "{pinned:?}");
    let usage = model.experts().usage().to_vec();
    for &(layer, expert) in &pinned {
        let min_pinned = pinned.iter().filter(|(l, _)| *l == layer).map(|&(l, e)| usage[l][e]).min().unwrap();
        let unpinned_max =
            (0..usage[layer].len()).filter(|e| !pinned.contains(&(layer, *e))).map(|e| usage[layer][e]).max().unwrap();
        assert!(min_pinned >= unpinned_max, "layer {layer}: pinned {expert} is not among the most used");
    }
    // Pinned experts survive a flood of other experts.
    for e in 0..8 {
        model.experts_mut().fetch(0, e).unwrap();
    }
    for &(layer, expert) in &pinned {
        assert!(model.experts().is_resident(layer, expert), "pinned ({layer}, {expert}) was evicted");
    }

    // A new configuration warms up afresh: uses from before it (here each layer's least used
    // expert, fetched a thousand times) do not decide what the next prompt pins.
    let prompt_usage = usage;
    for (layer, row) in prompt_usage.iter().enumerate() {
        let Some(least) = (0..row.len()).min_by_key(|&e| row[e]) else { continue };
        for _ in 0..1000 {
            model.experts_mut().fetch(layer, least).unwrap();
        }
    }
    let options = ExpertOptions {
        budget: VramBudget::FractionOfExperts(0.75),
        policy: EvictionPolicy::LfuPinned,
        ..Default::default()
    };
    model.set_expert_options(options).unwrap();
    prompt_forward(&mut model, &reference.input_ids);
    assert_eq!(model.experts().pinned(), pinned, "the same prompt after reconfiguring pins the same experts");
}

#[test]
fn a_budget_below_one_layers_top_k_says_the_minimum() {
    let opened = ferry_models::open(&fixture("qwen3_moe")).unwrap();
    let options = ExpertOptions { budget: VramBudget::Bytes(64 * 1024), ..Default::default() };
    let err =
        Model::load_with(opened.spec, &opened.weights, &gpu().device, options).err().expect("must fail").to_string();
    assert!(err.contains("--vram-budget") && err.contains("minimum"), "{err}");
    let err = "5 parsecs".parse::<VramBudget>().unwrap_err().to_string();
    assert!(err.contains("--vram-budget"), "{err}");
}

/// Under `--route-on device`, with every expert resident (in at most top-k pages per layer) a
/// decode step keeps its routes on the device: it reads the host twice (the logits, then every
/// MoE layer's routes at once) whatever the number of MoE layers, against once per MoE layer
/// plus the logits offloaded or under `--route-on host`; it reports the same routing, counts the
/// same expert uses as hits, and computes the offloaded run's bits.
#[test]
fn resident_decode_steps_keep_their_routes_on_the_device() {
    for family in FAMILIES {
        let reference = reference(family);
        let ids = &reference.input_ids[..6.min(reference.input_ids.len())];
        let opened = ferry_models::open(&fixture(family)).unwrap();
        let (moe, projection) =
            (&opened.spec.moe, opened.spec.hidden_size * opened.spec.moe.expert_intermediate_size * 4);
        let model = |budget, page_bytes, routing| {
            let options = ExpertOptions { budget, page_bytes, routing, ..Default::default() };
            Model::load_with(opened.spec.clone(), &opened.weights, &gpu().device, options).unwrap()
        };
        // Default pages (a layer's experts in one), then each layer's experts over two pages
        // (at most top-k keep the routes on the device), each page with its own tables; one
        // expert per page spreads a layer over more pages than top-k: its routes come back.
        assert!(moe.top_k >= 2 && moe.num_experts % 2 == 0, "{family}");
        let per_page = moe.num_experts / 2;
        let halves = Some((projection * per_page) as u64);
        for (page_bytes, routing, on_device) in [
            (None, Routing::Device, true),
            (halves, Routing::Device, true),
            (Some(projection as u64), Routing::Device, false),
            (None, Routing::Host, false),
        ] {
            let mut resident = model(VramBudget::All, page_bytes, routing);
            let mut offloaded = model(TOP_K_SLOTS, None, routing);
            let (mut rc, mut oc) = (resident.new_cache(ids.len()).unwrap(), offloaded.new_cache(ids.len()).unwrap());
            for &id in ids {
                let r = resident.forward(&[id], &mut rc, LogitsFor::All).unwrap();
                let o = offloaded.forward(&[id], &mut oc, LogitsFor::All).unwrap();
                let case = format!("{family} {page_bytes:?} {routing}");
                assert_eq!(r.logits, o.logits, "{case}: resident logits differ from offloaded");
                assert_eq!(r.routing, o.routing, "{case}");
                let moe_layers = o.routing.iter().filter(|l| !l.is_empty()).count();
                assert!(moe_layers >= 1, "{case}");
                let routes = if on_device { 1 } else { moe_layers };
                assert_eq!(r.host_reads, resident.lm_head_blocks() + routes, "{case}: the logits and the routes");
                assert_eq!(o.host_reads, moe_layers + 1, "{case}: each layer's routes and the logits");
            }
            let (r, o) = (resident.experts().stats(), offloaded.experts().stats());
            assert_eq!((r.hits, r.misses), (o.hits + o.misses, 0), "{family}: every use counted as a hit");
            assert_eq!(resident.experts().usage(), offloaded.experts().usage(), "{family}");
        }
        // Device routing keeps transformers' greedy tokens; auto is the host on a CPU adapter
        // (lavapipe, where launches cost more than reads) and the device on a GPU.
        let n = reference.greedy.new_ids.len();
        let mut engine = Engine::new(model(VramBudget::All, None, Routing::Device), None);
        let tokens = greedy(&mut engine, &reference.greedy.prompt_ids, n);
        assert_eq!(tokens, reference.greedy.new_ids, "{family}: greedy tokens under device routing");
        let steps = |routing| stepwise_logits(&mut model(VramBudget::All, None, routing), ids);
        let (device, host, auto) = (steps(Routing::Device), steps(Routing::Host), steps(Routing::Auto));
        let cpu = gpu().adapter.device_type == "Cpu";
        assert!(auto == if cpu { host } else { device }, "{family}: auto routing on a CPU adapter: {cpu}");
    }
}

#[test]
fn generation_reports_expert_traffic_per_step() {
    let reference = reference("mixtral");
    let model = load("mixtral", VramBudget::FractionOfExperts(0.25), EvictionPolicy::Lru);
    let mut engine = Engine::new(model, None);
    let request = GenerateRequest {
        prompt_ids: reference.greedy.prompt_ids.clone(),
        max_new_tokens: 6,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    };
    let mut steps = Vec::new();
    let output = engine
        .generate(&request, |e| {
            if let ferry_runtime::engine::Event::Step(s) = e {
                steps.push(s.clone());
            }
        })
        .unwrap();
    assert_eq!(steps.len(), 6, "the prompt and five decoded tokens");
    let summed = steps.iter().skip(1).fold(ExpertStats::default(), |acc, s| acc + s.experts);
    assert_eq!(summed.misses, output.stats.decode_experts.misses);
    assert_eq!(steps[0].experts.misses, output.stats.prefill_experts.misses);
    // Each decode step routes one token to top-2 experts in each of 2 layers.
    for s in &steps[1..] {
        assert_eq!(s.experts.hits + s.experts.misses, 4);
        assert!(s.resident_per_layer.iter().sum::<usize>() <= 4);
        // One read-back of router logits per MoE layer and one of the logits (one head block);
        // the kernels launched are counted with the units they start and the weights they read.
        let k = s.kernels;
        assert_eq!(k.host_reads, 3, "{k:?}");
        assert!(k.matrix_launches > 0 && k.launches > k.matrix_launches, "{k:?}");
        assert!(k.matrix_units > 0 && k.units >= k.matrix_units && k.weight_bytes > 0, "{k:?}");
    }
    let decode = steps[1..].iter().fold(ferry_runtime::engine::KernelStats::default(), |mut acc, s| {
        acc += s.kernels;
        acc
    });
    assert_eq!(decode, output.stats.decode_kernels, "the decode total is the steps' sum");
}
