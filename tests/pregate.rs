//! Pre-gating: predicting the next MoE layer's experts and fetching them ahead changes what is
//! resident, never the output; its recall is scored against the routing actually used.

use ferry_runtime::engine::Engine;
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::options::{ExpertOptions, LinkModel, PrefetchMode, VramBudget};

use crate::support::{FAMILIES, copy_fixture, edit_config, fixture, gpu, greedy, reference};

fn load(family: &str, budget: VramBudget, prefetch: PrefetchMode, extra: usize, link: Option<LinkModel>) -> Model {
    let opened = ferry_models::open(&fixture(family)).unwrap();
    let options = ExpertOptions { budget, prefetch, prefetch_extra: extra, link, ..Default::default() };
    Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
}

#[test]
fn prefetching_leaves_logits_and_tokens_unchanged() {
    for family in FAMILIES {
        let reference = reference(family);
        let quarter = VramBudget::FractionOfExperts(0.25);
        let mut plain = load(family, quarter, PrefetchMode::None, 0, None);
        let mut cache = plain.new_cache(reference.input_ids.len()).unwrap();
        let expected = plain.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
        let expected_ids = greedy(&mut Engine::new(plain, None), &reference.greedy.prompt_ids, 10);
        for extra in [0, 2] {
            let mut model = load(family, quarter, PrefetchMode::Pregate, extra, None);
            let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
            let out = model.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
            assert_eq!(out.logits, expected.logits, "{family} extra {extra}");
            let mut engine = Engine::new(model, None);
            assert_eq!(greedy(&mut engine, &reference.greedy.prompt_ids, 10), expected_ids, "{family} extra {extra}");
            let stats = engine.model.experts().stats();
            assert!(stats.prefetched > 0, "{family}: pregate never prefetched");
            assert!(stats.prefetch_hits <= stats.prefetched);
        }
    }
}

#[test]
fn predicting_every_expert_has_full_recall() {
    let reference = reference("mixtral");
    let mut model = load("mixtral", VramBudget::All, PrefetchMode::Pregate, 6, None);
    let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
    model.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
    let recall = model.experts().recall().to_vec();
    assert_eq!(recall[0].actual, 0, "the first MoE layer is never predicted");
    let tokens = reference.input_ids.len() as u64;
    assert_eq!(recall[1].actual, 2 * tokens);
    assert_eq!(recall[1].predicted, recall[1].actual);
}

#[test]
fn recall_matches_transformers_predictions() {
    for family in FAMILIES {
        let reference = reference(family);
        assert!(!reference.pregate.is_empty(), "{family}: reference.json has no pregate predictions");
        let mut model = load(family, VramBudget::All, PrefetchMode::Pregate, 0, None);
        let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
        model.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
        let recall = model.experts().recall().to_vec();
        for pair in &reference.pregate {
            let real = &reference.routing[pair.to];
            let predicted: u64 =
                real.iter().zip(&pair.experts).map(|(r, p)| r.iter().filter(|e| p.contains(e)).count() as u64).sum();
            let actual: u64 = real.iter().map(|r| r.len() as u64).sum();
            assert_eq!(
                (recall[pair.to].predicted, recall[pair.to].actual),
                (predicted, actual),
                "{family}: layer {} predicted from layer {}",
                pair.to,
                pair.from
            );
        }
    }
}

#[test]
fn an_emulated_link_makes_each_upload_take_its_transfer_time() {
    let reference = reference("olmoe");
    // 1 MB/s: one 24 KiB fixture expert takes about 25 ms.
    let link = LinkModel::from_gb_per_s(0.001);
    let mut model = load("olmoe", VramBudget::FractionOfExperts(0.25), PrefetchMode::None, 0, Some(link));
    let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
    model.forward(&reference.input_ids, &mut cache, LogitsFor::Last).unwrap();
    let stats = model.experts().stats();
    let plan = model.experts().plan().clone();
    let floor = stats.misses as f64 * plan.slot_bytes as f64 / link.bytes_per_second;
    assert!(stats.stall_seconds >= floor, "stalled {} s, the link needs at least {floor} s", stats.stall_seconds);
}

#[test]
fn a_trained_pre_gate_in_the_checkpoint_replaces_the_next_router() {
    // Write the fixture again with `model.layers.0.mlp.pre_gate.weight` equal to layer 0's own
    // router: predictions for layer 1 then come from layer 0's router, not layer 1's.
    let source = fixture("qwen2_moe");
    let tmp = std::env::temp_dir().join(format!("ferry-pregate-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.join(entry.file_name())).unwrap();
    }
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = tensors.tensors();
    let router = tensors.tensor("model.layers.0.mlp.gate.weight").unwrap();
    views.push(("model.layers.0.mlp.pre_gate.weight".into(), router));
    safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors")).unwrap();

    let reference = reference("qwen2_moe");
    let opened = ferry_models::open(&tmp).unwrap();
    let options = ExpertOptions { prefetch: PrefetchMode::Pregate, ..Default::default() };
    let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
    assert!(model.has_trained_pregate(0));
    let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
    let out = model.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
    // Layer 0's router on its own input predicts exactly layer 0's routing; score that against
    // layer 1's real routing.
    let expected: u64 = out.routing[1]
        .iter()
        .zip(&out.routing[0])
        .map(|(real, guess)| real.iter().filter(|e| guess.contains(e)).count() as u64)
        .sum();
    assert_eq!(model.experts().recall()[1].predicted, expected);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--pregate-routing`: the predictor's choice is the next layer's routing. With layer 0's own
/// router as the trained pre-gate, layer 1 routes exactly as layer 0 does; every prediction is a
/// hit by construction; a model with one MoE layer refuses the flag.
#[test]
fn pregate_routing_makes_the_prediction_the_routing() {
    let source = fixture("qwen2_moe");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = tensors.tensors();
    views
        .push(("model.layers.0.mlp.pre_gate.weight".into(), tensors.tensor("model.layers.0.mlp.gate.weight").unwrap()));
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();

    let reference = reference("qwen2_moe");
    let ids = &reference.input_ids;
    let run = |prefetch, pregate_routing| {
        let opened = ferry_models::open(tmp.path()).unwrap();
        let budget = VramBudget::FractionOfExperts(0.5);
        let options = ExpertOptions { budget, prefetch, pregate_routing, ..Default::default() };
        let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
        let mut cache = model.new_cache(ids.len()).unwrap();
        let mut out = model.forward(&ids[..3], &mut cache, LogitsFor::All).unwrap();
        for &id in &ids[3..] {
            let step = model.forward(&[id], &mut cache, LogitsFor::All).unwrap();
            out.logits.extend(step.logits);
            for (all, layer) in out.routing.iter_mut().zip(step.routing) {
                all.extend(layer);
            }
        }
        (out, model.experts().recall().to_vec(), model.experts().stats())
    };
    let (plain, _, _) = run(PrefetchMode::None, false);
    assert_ne!(plain.routing[1], plain.routing[0], "the fixture's layers route differently on their own");
    for prefetch in [PrefetchMode::None, PrefetchMode::Pregate] {
        let (routed, recall, stats) = run(prefetch, true);
        assert_eq!(routed.routing[0], plain.routing[0], "{prefetch}: the first MoE layer keeps its own router");
        assert_eq!(routed.routing[1], routed.routing[0], "{prefetch}: layer 1 must route as its pre-gate chose");
        assert!(routed.logits.iter().flatten().all(|v| v.is_finite()));
        assert_ne!(routed.logits, plain.logits, "{prefetch}: another routing gives other logits");
        if prefetch == PrefetchMode::Pregate {
            assert_eq!(recall[1].predicted, recall[1].actual, "{prefetch}: the prediction is the routing");
            assert!(stats.prefetch_hits > 0, "{stats:?}");
        }
    }

    // One MoE layer: nothing to choose another layer's experts.
    let (_keep, one) = copy_fixture("olmoe");
    edit_config(&one, |c| c["num_hidden_layers"] = 1.into());
    let opened = ferry_models::open(&one).unwrap();
    let options = ExpertOptions { pregate_routing: true, ..Default::default() };
    let err = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).err().unwrap().to_string();
    assert!(err.contains("--pregate-routing") && err.contains("fewer than two MoE layers"), "{err}");
}
