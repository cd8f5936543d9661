//! Big-little experts: little tokens use the top-k/2 of the same ranking, big ones the full
//! top-k, counted and switchable; with every token big the output is exactly full mode's.

use ferry_runtime::experts::{BigFallback, BigLittle, Importance, VramBudget};
use ferry_runtime::graph::{ExpertOptions, ForwardOutput, LogitsFor, Model};
use ferry_tests::{fixture, gpu, reference};

fn run(family: &str, options: ExpertOptions) -> (ForwardOutput, Model) {
    let reference = reference(family);
    let opened = ferry_models::open(&fixture(family)).unwrap();
    let model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
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
    let options = ExpertOptions {
        big_little: big_little(0.5, Importance::DroppedMass, BigFallback::Fetch),
        ..Default::default()
    };
    let (out, model) = run("olmoe", options);
    let stats = model.experts().stats();
    let choices = (stats.big + stats.little) as f64;
    assert_eq!(choices as usize, 2 * reference.input_ids.len());
    assert!((stats.big as f64 / choices - 0.5).abs() < 0.1, "{stats:?}");
    let little = out.routing.iter().flatten().filter(|r| r.len() == 1).count() as u64;
    assert_eq!(little, stats.little);
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
