//! Big-little experts: little tokens use the top-k/2 of the same ranking, big ones the full
//! top-k, counted and switchable; with every token big the output is exactly full mode's.

use ferry_runtime::engine::Engine;
use ferry_runtime::graph::{ForwardOutput, LogitsFor, Model};
use ferry_runtime::options::{BigFallback, BigLittle, ExpertOptions, Importance, PrefetchMode, VramBudget};

use crate::support::{FAMILIES, fixture, gpu, greedy, reference};

const IMPORTANCES: [Importance; 3] = [Importance::DroppedMass, Importance::Entropy, Importance::Attention];

fn run(family: &str, options: ExpertOptions) -> (ForwardOutput, Model) {
    let reference = reference(family);
    let opened = ferry_models::open(&fixture(family)).unwrap();
    let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
    let mut cache = model.new_cache(reference.input_ids.len()).unwrap();
    let out = model.forward(&reference.input_ids, &mut cache, LogitsFor::All).unwrap();
    (out, model)
}

fn big_little(fraction: f32, importance: Importance, fallback: BigFallback) -> Option<BigLittle> {
    Some(BigLittle { importance, big_fraction: fraction, fallback })
}

#[test]
fn all_big_equals_full_mode_exactly() {
    for family in ["mixtral", "qwen2_moe"] {
        let (full, _) = run(family, ExpertOptions::default());
        let options = ExpertOptions {
            big_little: big_little(1.0, Importance::DroppedMass, BigFallback::Fetch),
            ..Default::default()
        };
        let (all_big, model) = run(family, options);
        assert_eq!(all_big.logits, full.logits, "{family}");
        assert_eq!(all_big.routing, full.routing, "{family}");
        let stats = model.experts().stats();
        assert_eq!(stats.little, 0);
        assert!(stats.big > 0);
    }
}

/// Every importance, with and without pre-gating at a quarter budget (so that predictions are
/// staged and slots evicted): all big is full mode, in a prefill and over greedy decode steps.
#[test]
fn all_big_equals_full_mode_exactly_for_every_importance_with_and_without_pregate() {
    for family in ["mixtral", "qwen2_moe"] {
        let reference = reference(family);
        let budget = VramBudget::FractionOfExperts(0.25);
        let (full, full_model) = run(family, ExpertOptions { budget, ..Default::default() });
        let full_ids = greedy(&mut Engine::new(full_model, None), &reference.greedy.prompt_ids, 8);
        for importance in IMPORTANCES {
            for prefetch in [PrefetchMode::None, PrefetchMode::Pregate] {
                let options = ExpertOptions {
                    budget,
                    prefetch,
                    big_little: big_little(1.0, importance, BigFallback::Fetch),
                    ..Default::default()
                };
                let what = format!("{family} {importance} {prefetch:?}");
                let (all_big, model) = run(family, options);
                assert_eq!(all_big.logits, full.logits, "{what}");
                assert_eq!(all_big.routing, full.routing, "{what}");
                let mut engine = Engine::new(model, None);
                assert_eq!(greedy(&mut engine, &reference.greedy.prompt_ids, 8), full_ids, "{what}");
                let stats = engine.model.experts().stats();
                assert_eq!(stats.little, 0, "{what}");
                if prefetch == PrefetchMode::Pregate {
                    // Every token was expected big and was big.
                    assert!(stats.modes_predicted > 0, "{what}: no mode was predicted");
                    assert_eq!(stats.modes_predicted_right, stats.modes_predicted, "{what}");
                } else {
                    assert_eq!(stats.modes_predicted, 0, "{what}");
                }
            }
        }
    }
}

/// With every token expected little, the pre-gate stages only the first top-k/2 of its
/// prediction: recall against the (little) routing actually used equals what transformers'
/// pre-gate predictions, cut to their first half, give.
#[test]
fn tokens_expected_little_get_half_their_predicted_experts_staged() {
    let mut half_differs_from_full = false;
    for family in FAMILIES {
        let reference = reference(family);
        let options = ExpertOptions {
            prefetch: PrefetchMode::Pregate,
            big_little: big_little(0.0, Importance::DroppedMass, BigFallback::Fetch),
            ..Default::default()
        };
        let (out, model) = run(family, options);
        let recall = model.experts().recall().to_vec();
        let stats = model.experts().stats();
        // Only the first pair predicts from transformers' own hidden states: little layers move
        // every later layer's input away from the reference's.
        for pair in reference.pregate.iter().take(1) {
            let real = &out.routing[pair.to];
            let hits = |keep: usize| -> u64 {
                real.iter()
                    .zip(&pair.experts)
                    .map(|(r, p)| r.iter().filter(|e| p[..keep].contains(e)).count() as u64)
                    .sum()
            };
            let top_k = pair.experts[0].len();
            assert_eq!(recall[pair.to].predicted, hits(top_k.div_ceil(2)), "{family}: layer {}", pair.to);
            half_differs_from_full |= hits(top_k.div_ceil(2)) != hits(top_k);
        }
        let predicted_layers = reference.pregate.len() as u64;
        assert_eq!(stats.modes_predicted, predicted_layers * reference.input_ids.len() as u64, "{family}");
        assert_eq!(stats.modes_predicted_right, stats.modes_predicted, "{family}: all little, all expected little");
    }
    assert!(half_differs_from_full, "no family tells half staging from full staging apart");
}

#[test]
fn all_little_uses_the_first_half_of_each_route() {
    let reference = reference("qwen3_moe");
    let options =
        ExpertOptions { big_little: big_little(0.0, Importance::Entropy, BigFallback::Fetch), ..Default::default() };
    let (out, model) = run("qwen3_moe", options);
    // The first MoE layer sees the reference's hidden states: its little routes are the first
    // half of transformers' top-2. Later layers see states the change already moved.
    for (t, experts) in out.routing[0].iter().enumerate() {
        assert_eq!(experts.as_slice(), &reference.routing[0][t][..1], "token {t}");
    }
    assert!(out.routing.iter().flatten().all(|r| r.len() == 1));
    let stats = model.experts().stats();
    let tokens = reference.input_ids.len() as u64;
    assert_eq!(stats.little, 2 * tokens, "two MoE layers");
    assert_eq!(stats.big, 0);
    assert_ne!(out.logits, run("qwen3_moe", ExpertOptions::default()).0.logits, "little must change the output");
}

#[test]
fn the_big_fraction_is_met_in_a_prefill() {
    let reference = reference("olmoe");
    for importance in IMPORTANCES {
        let options =
            ExpertOptions { big_little: big_little(0.5, importance, BigFallback::Fetch), ..Default::default() };
        let (out, model) = run("olmoe", options);
        let stats = model.experts().stats();
        let choices = (stats.big + stats.little) as f64;
        assert_eq!(choices as usize, 2 * reference.input_ids.len(), "{importance}");
        assert!((stats.big as f64 / choices - 0.5).abs() < 0.1, "{importance}: {stats:?}");
        let little = out.routing.iter().flatten().filter(|r| r.len() == 1).count() as u64;
        assert_eq!(little, stats.little, "{importance}");
    }
}

#[test]
fn substitution_only_uses_resident_experts_and_is_counted() {
    let options = ExpertOptions {
        budget: VramBudget::FractionOfExperts(0.25),
        big_little: big_little(1.0, Importance::DroppedMass, BigFallback::Substitute),
        ..Default::default()
    };
    let (_, model) = run("mixtral", options);
    let stats = model.experts().stats();
    assert!(stats.fallbacks > 0 && stats.substitutions > 0, "{stats:?}");
    assert!(stats.substitutions <= stats.fallbacks * 2);
}

/// Prompt, then `steps` greedy decode passes; the routing of every decode pass.
fn decode_routing(model: &mut Model, prompt: &[u32], steps: usize) -> Vec<Vec<Vec<Vec<u32>>>> {
    let mut cache = model.new_cache(prompt.len() + steps).unwrap();
    let mut out = model.forward(prompt, &mut cache, LogitsFor::Last).unwrap();
    let mut routing = Vec::new();
    for _ in 0..steps {
        let next = ferry_runtime::sampling::argmax(&out.logits[0]);
        out = model.forward(&[next], &mut cache, LogitsFor::Last).unwrap();
        routing.push(out.routing.clone());
    }
    routing
}

#[test]
fn switching_the_importance_score_starts_its_threshold_afresh() {
    // Scores of different importances are on different scales; a history of one must not set
    // the other's decode threshold. After a switch, decisions equal a fresh model's.
    let prompt = reference("olmoe").input_ids;
    let options = |importance| ExpertOptions {
        big_little: big_little(0.3, importance, BigFallback::Fetch),
        ..Default::default()
    };
    let load = |options| {
        let opened = ferry_models::open(&fixture("olmoe")).unwrap();
        Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
    };
    let expected = decode_routing(&mut load(options(Importance::Entropy)), &prompt, 24);
    let mut switched = load(options(Importance::DroppedMass));
    decode_routing(&mut switched, &prompt, 24);
    let before = switched.experts().stats();
    switched.set_expert_options(options(Importance::Entropy)).unwrap();
    assert_eq!(decode_routing(&mut switched, &prompt, 24), expected);
    // Counters stay cumulative across the switch and after turning big-little off (an engine
    // subtracts snapshots taken before a mid-reply change).
    let after = switched.experts().stats();
    assert!(after.big >= before.big && after.little >= before.little, "{before:?} -> {after:?}");
    switched.set_expert_options(ExpertOptions::default()).unwrap();
    assert_eq!(switched.experts().stats().big, after.big);
}
