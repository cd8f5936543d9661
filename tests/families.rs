//! What DeepSeek-V2/V3 and GPT-OSS add beyond the golden logits: MLA's latent KV cache and its
//! size, MXFP4 experts uploaded as they ship against dequantising them on load, the sliding
//! window's bounded cache, and grouped routing under big-little.

use ferry_runtime::engine::Engine;
use ferry_runtime::graph::{ForwardOutput, LogitsFor, Model};
use ferry_runtime::options::ExpertOptions;
use ferry_runtime::options::{BigFallback, BigLittle, ExpertDtype, Importance, VramBudget};
use ferry_runtime::spec::ExpertLayout;

use crate::support::{fixture, gpu, greedy, max_abs_diff, reference};

fn load(family: &str, options: ExpertOptions) -> Model {
    let opened = ferry_models::open(&fixture(family)).unwrap();
    Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
}

fn prompt_forward(model: &mut Model, ids: &[u32]) -> ForwardOutput {
    let mut cache = model.new_cache(ids.len()).unwrap();
    model.forward(ids, &mut cache, LogitsFor::All).unwrap()
}

/// The cache holds the latent and the rope key, the sizes transformers' config implies.
#[test]
fn mla_caches_the_latent_and_reports_what_it_saves() {
    for family in ["deepseek_v2", "deepseek_v3"] {
        let reference = reference(family);
        let spec = ferry_models::read_spec(&fixture(family)).unwrap();
        let a = &spec.attention;
        let m = a.mla.as_ref().expect("an MLA spec");
        assert_eq!(a.kv_elements_per_token(), m.kv_lora_rank + m.qk_rope_head_dim);
        let per_token = |elements: usize| elements * spec.num_layers() * 4;
        assert_eq!(Some(per_token(a.kv_elements_per_token())), reference.kv_bytes_per_token_latent, "{family}");
        assert_eq!(
            Some(per_token(a.kv_elements_per_token_expanded())),
            reference.kv_bytes_per_token_expanded,
            "{family}"
        );
        assert!(a.kv_elements_per_token_expanded() > 2 * a.kv_elements_per_token(), "{family}: MLA saves little");
    }
}

/// GPT-OSS ships MXFP4 experts: uploading the codes and dequantising in the kernel gives what
/// dequantising to f32 on load gives, up to summation order; routing and greedy tokens agree.
#[test]
fn mxfp4_experts_in_the_kernel_match_dequantising_on_load() {
    let reference = reference("gpt_oss");
    assert_eq!(ferry_models::read_spec(&fixture("gpt_oss")).unwrap().moe.layout, ExpertLayout::Mxfp4);
    let run = |expert_dtype| {
        let mut model = load("gpt_oss", ExpertOptions { expert_dtype, ..Default::default() });
        let out = prompt_forward(&mut model, &reference.input_ids);
        let ids = greedy(&mut Engine::new(model, None), &reference.greedy.prompt_ids, reference.greedy.new_ids.len());
        (out, ids)
    };
    let (mxfp4, mxfp4_ids) = run(ExpertDtype::Mxfp4);
    let (f32, f32_ids) = run(ExpertDtype::F32);
    let (diff, scale) = max_abs_diff(&mxfp4.logits, &f32.logits);
    eprintln!("gpt_oss: MXFP4 kernel vs dequantised on load: max |logit diff| {diff:.3e} (largest {scale:.3})");
    assert!(diff <= 1e-5 * scale.max(1.0), "MXFP4 path differs from dequantise-on-load by {diff}");
    assert_eq!(mxfp4.routing, f32.routing);
    assert_eq!(mxfp4_ids, f32_ids);
    assert_eq!(mxfp4_ids, reference.greedy.new_ids, "MXFP4 greedy tokens differ from transformers");
}

/// Offloaded MXFP4 experts equal all-resident ones bit for bit, and each upload moves the MXFP4
/// slot size (codes plus f32 scales), about a seventh of f32.
#[test]
fn offloaded_mxfp4_experts_are_exact_and_move_their_own_size() {
    let ids = reference("gpt_oss").input_ids;
    let options = |budget| ExpertOptions { budget, expert_dtype: ExpertDtype::Mxfp4, ..Default::default() };
    let expected = prompt_forward(&mut load("gpt_oss", options(VramBudget::All)), &ids);
    let mut model = load("gpt_oss", options(VramBudget::FractionOfExperts(0.25)));
    let out = prompt_forward(&mut model, &ids);
    assert_eq!(out.logits, expected.logits);
    let stats = model.experts().stats();
    let spec = model.spec();
    let size = ExpertDtype::Mxfp4.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
    assert!(stats.misses > 0);
    assert_eq!(stats.bytes_uploaded, stats.misses * size);
    assert!(size * 6 < ExpertDtype::F32.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size));
}

/// Sliding layers keep at most `window - 1` positions however long the sequence grows; full
/// layers keep them all. Greedy decoding past the window matches transformers (golden tests), so
/// here only the bound is checked.
#[test]
fn sliding_layers_keep_a_cache_bounded_by_the_window() {
    let reference = reference("gpt_oss");
    let mut model = load("gpt_oss", ExpertOptions::default());
    let spec = model.spec().clone();
    let window = spec.attention.sliding_window.expect("gpt_oss has a sliding window");
    let ids = &reference.input_ids;
    assert!(ids.len() > window, "the fixture's prompt must be longer than the window");
    let mut cache = model.new_cache(ids.len() + 4).unwrap();
    model.forward(ids, &mut cache, LogitsFor::Last).unwrap();
    for &id in &reference.greedy.new_ids[..4] {
        model.forward(&[id], &mut cache, LogitsFor::Last).unwrap();
    }
    let mut sliding = 0;
    for layer in 0..spec.num_layers() {
        match spec.attention.window(layer) {
            Some(w) => {
                sliding += 1;
                // Pages of 64 positions: the window's and at most a page before it.
                let held = cache.held(layer);
                assert!(held >= w && held < w + 64, "sliding layer {layer} holds {held}");
            }
            None => assert_eq!(cache.held(layer), ids.len() + 4, "full layer {layer}"),
        }
    }
    assert!(sliding > 0 && sliding < spec.num_layers(), "gpt_oss alternates sliding and full layers");
    let full = spec.attention.kv_elements(spec.num_layers(), 1000);
    assert!(full < spec.num_layers() * spec.attention.kv_elements_per_token() * 1000, "the budget counts the bound");
}

/// Big-little on grouped routing: a little token runs the first ceil(k/2) experts of the grouped
/// ranking, so only experts of the groups the router kept.
#[test]
fn little_tokens_take_the_head_of_the_grouped_ranking() {
    for family in ["deepseek_v2", "deepseek_v3"] {
        let reference = reference(family);
        let options = ExpertOptions {
            big_little: Some(BigLittle {
                importance: Importance::Entropy,
                big_fraction: 0.0,
                fallback: BigFallback::Fetch,
            }),
            ..Default::default()
        };
        let mut model = load(family, options);
        let out = prompt_forward(&mut model, &reference.input_ids);
        let k = model.spec().moe.top_k;
        // The first MoE layer sees transformers' hidden states; later ones have moved.
        let first = out.routing.iter().position(|l| !l.is_empty()).unwrap();
        for (t, experts) in out.routing[first].iter().enumerate() {
            assert_eq!(experts.as_slice(), &reference.routing[first][t][..k.div_ceil(2)], "{family} token {t}");
        }
    }
}

/// MLA decode steps absorb `kv_b_proj` into the query and output instead of expanding every
/// cached latent: token-by-token logits match a prefill of the same sequence (expanded keys and
/// values) up to float summation order.
#[test]
fn absorbed_mla_decode_matches_the_expanded_prefill() {
    for family in ["deepseek_v2", "deepseek_v3"] {
        let reference = reference(family);
        let mut model = load(family, ExpertOptions::default());
        let ids = &reference.input_ids;
        let expected = prompt_forward(&mut model, ids).logits;
        let mut cache = model.new_cache(ids.len()).unwrap();
        let mut stepped = model.forward(&ids[..4], &mut cache, LogitsFor::All).unwrap().logits;
        for &id in &ids[4..] {
            stepped.extend(model.forward(&[id], &mut cache, LogitsFor::All).unwrap().logits);
        }
        let (diff, scale) = max_abs_diff(&stepped, &expected);
        eprintln!("{family}: absorbed decode vs expanded prefill: max |logit diff| {diff:.3e} (largest {scale:.3})");
        assert!(diff <= 1e-5 * scale.max(1.0), "{family}: absorbed decode differs by {diff}");
        let (diff_ref, _) = max_abs_diff(&stepped, &reference.logits);
        assert!(diff_ref <= 1e-5 * scale.max(1.0), "{family}: decode differs from transformers by {diff_ref}");
    }
}
