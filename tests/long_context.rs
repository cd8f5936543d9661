//! Long prompts in bounded memory: decode across KV pages, windowed layers that drop what no
//! query sees, offloaded experts over a chunked prefill, and contexts refused before any work.

use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::options::{EvictionPolicy, ExpertOptions, VramBudget};
use ferry_runtime::spec::FfnKind;

use crate::cli::{error_line, ferry, json_of};
use crate::support::{edit_config, fixture, gpu, long_reference, max_abs_diff, small_page_bytes};

fn load(family: &str, options: ExpertOptions) -> Model {
    let opened = ferry_models::open(&fixture(family)).expect("fixture opens");
    Model::load_with(opened.spec, &opened.weights, &gpu().device, options).expect("fixture loads")
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32
}

/// 100 prompt tokens, then 100 decode steps fed the same tokens on a cache of one page (the
/// decode kernel) and on pages of one block with 30-token prefill passes (the flash kernel
/// across pages): logits agree within float rounding at every step. The sliding layers of
/// gpt_oss keep about their window, not the sequence.
#[test]
fn decode_across_kv_pages_agrees_with_one_page() {
    for family in ["gpt_oss", "deepseek_v2", "qwen3_moe"] {
        let ids = &long_reference(family).input_ids[..100];
        let mut whole = load(family, ExpertOptions::default());
        let page_bytes = small_page_bytes(whole.spec());
        let mut paged =
            load(family, ExpertOptions { page_bytes: Some(page_bytes), prefill_chunk: 30, ..Default::default() });
        let mut one_page = whole.new_cache(200).unwrap();
        let mut pages = paged.new_cache(200).unwrap();
        let mut a = whole.forward(ids, &mut one_page, LogitsFor::Last).unwrap().logits;
        let mut b = paged.forward(ids, &mut pages, LogitsFor::Last).unwrap().logits;
        let mut worst = (0.0f32, 0.0f32);
        for step in 0..100 {
            let (diff, scale) = max_abs_diff(&b, &a);
            worst = (worst.0.max(diff), worst.1.max(scale));
            assert!(diff <= 1e-5 * scale.max(1.0), "{family} step {step}: logits differ by {diff}");
            let next = argmax(&a[0]);
            a = whole.forward(&[next], &mut one_page, LogitsFor::Last).unwrap().logits;
            b = paged.forward(&[next], &mut pages, LogitsFor::Last).unwrap().logits;
        }
        eprintln!(
            "{family}: 100 decode steps over pages of {} positions, max |logit diff| {:.2e}",
            pages.page_positions(),
            worst.0
        );
        assert!(pages.page_positions() < 200, "{family}: the paged cache has one page");
        let spec = paged.spec();
        for layer in 0..spec.num_layers() {
            let held = pages.held(layer);
            match spec.attention.window(layer) {
                Some(w) => assert!(held < w + 2 * 64, "{family} layer {layer}: a window of {w} holds {held} positions"),
                None => assert_eq!(held, 200, "{family} layer {layer}"),
            }
        }
    }
}

/// A 250-token prompt in 64-token passes under the smallest budget (one layer's top-k slots):
/// each pass streams its experts layer by layer through those slots, and the logits equal the
/// all-resident one-pass logits bit for bit.
#[test]
fn a_long_prompt_offloaded_in_chunks_equals_all_resident_bit_for_bit() {
    for family in ["mixtral", "deepseek_v3"] {
        let ids = &long_reference(family).input_ids;
        let mut resident = load(family, ExpertOptions::default());
        let mut cache = resident.new_cache(ids.len()).unwrap();
        let expected = resident.forward(ids, &mut cache, LogitsFor::All).unwrap();
        // The smallest budget that works: one layer's top-k slots.
        let spec = resident.spec();
        let top_k = spec.moe.top_k as f64;
        let experts = (spec.layers.iter().filter(|l| matches!(l, FfnKind::Moe)).count() * spec.moe.num_experts) as f64;
        let budget = VramBudget::FractionOfExperts(top_k / experts);
        let options = ExpertOptions { budget, policy: EvictionPolicy::Lru, prefill_chunk: 64, ..Default::default() };
        let mut offloaded = load(family, options);
        assert_eq!(offloaded.experts().plan().slots, top_k as usize, "{family}: one layer's top-k slots");
        let mut cache = offloaded.new_cache(ids.len()).unwrap();
        let out = offloaded.forward(ids, &mut cache, LogitsFor::All).unwrap();
        assert!(out.logits == expected.logits, "{family}: chunked offloaded logits differ from all-resident");
        assert_eq!(out.routing, expected.routing, "{family}");
        assert!(offloaded.experts().stats().misses > 0, "{family}: the offloaded prefill streamed experts");
    }
}

/// A prompt longer than the KV cache reserved under `--max-context` is one error line naming
/// the prompt, the limit and the flags to change; `--prefill-chunk 0` is named too.
#[test]
fn a_context_beyond_the_reservation_is_refused_before_any_work() {
    let model = fixture("qwen3_moe");
    let ids = (1..=40).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let args = ["generate", "--model", model.to_str().unwrap(), "--ids", &ids, "--max-new-tokens", "2"];
    let line = error_line(&ferry(&[&args[..], &["--max-context", "32"]].concat()));
    assert!(line.contains("40 tokens") && line.contains("32 tokens") && line.contains("--max-context"), "{line}");
    assert!(line.contains("--vram-budget"), "{line}");
    // Within the reservation it runs; its KV pages hold the 42 positions asked for.
    let out = json_of(&ferry(&[&args[..], &["--max-context", "64", "--json"]].concat()));
    let info = json_of(&ferry(&["info", "--model", model.to_str().unwrap(), "--json"]));
    let per_token = info["kv_bytes_per_token_f32"].as_u64().unwrap();
    assert_eq!(out["stats"]["kv_cache_bytes"].as_u64().unwrap(), 42 * per_token);
    let line = error_line(&ferry(&[&args[..], &["--prefill-chunk", "0"]].concat()));
    assert!(line.contains("--prefill-chunk"), "{line}");
    // A pass of 3M queries: 4 heads x 3M x 512 keys of scores, 25 GB, beyond any adapter's
    // buffer: refused before the pass.
    let (_tmp, dir) = crate::support::copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(1 << 23));
    let opened = ferry_models::open(&dir).unwrap();
    let options = ExpertOptions { prefill_chunk: 1 << 27, ..Default::default() };
    let mut big = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
    let mut cache = big.new_cache(3_000_000).unwrap();
    let err = big.forward(&vec![5; 3_000_000], &mut cache, LogitsFor::Last).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("a pass of 3000000 tokens") && err.contains("--prefill-chunk"), "{err}");
    assert_eq!(cache.len(), 0, "nothing ran");
}

/// `bench --prefill-curve`: one point per length; attention's scratch stops growing at the
/// prefill chunk while the KV cache grows with the prompt. `info` names the longest context a
/// byte budget holds.
#[test]
fn the_prefill_curve_and_the_longest_context_at_a_budget_are_reported() {
    let model = fixture("mixtral");
    let model = model.to_str().unwrap();
    let out =
        json_of(&ferry(&["bench", "--model", model, "--prefill-curve", "64,200", "--prefill-chunk", "64", "--json"]));
    let points = out["prefill_curve"].as_array().unwrap();
    assert_eq!(points.iter().map(|p| p["prompt_len"].as_u64().unwrap()).collect::<Vec<_>>(), [64, 200]);
    assert_eq!(points[0]["attention_scratch_bytes"], points[1]["attention_scratch_bytes"]);
    let kv = |p: &serde_json::Value| p["kv_bytes"].as_u64().unwrap();
    assert_eq!(kv(&points[1]) * 64, kv(&points[0]) * 200);
    assert!(points.iter().all(|p| p["prefill_tokens_per_second"].as_f64().unwrap() > 0.0));
    let line = error_line(&ferry(&["bench", "--model", model, "--prefill-curve", "4k"]));
    assert!(line.contains("4096") && line.contains("context"), "{line}");

    let info = |budget: &str| json_of(&ferry(&["info", "--model", model, "--vram-budget", budget, "--json"]));
    let roomy = info("64MiB");
    assert_eq!(roomy["longest_context_at_budget"], roomy["context"]);
    let per_token = roomy["kv_bytes_per_token_f32"].as_u64().unwrap();
    let resident = roomy["gpu_resident_bytes"].as_u64().unwrap();
    let slots = 2 * roomy["expert_bytes_each"].as_u64().unwrap();
    let budget = resident + slots + 100 * per_token + per_token / 2;
    let tight = info(&budget.to_string());
    assert_eq!(tight["longest_context_at_budget"], 100);
    assert!(info("all")["longest_context_at_budget"].is_null());
}

/// An 8192-token prompt (many blocks, many pages) through a fixture-sized model given a 32k
/// context: it runs to the end with finite logits in pages that each fit a small binding.
#[test]
fn an_eight_thousand_token_prompt_runs_through_a_32k_context() {
    let (_tmp, dir) = crate::support::copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(32768));
    let opened = ferry_models::open(&dir).unwrap();
    let options = ExpertOptions { page_bytes: Some(1 << 18), ..Default::default() };
    let mut model = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
    let ids: Vec<u32> = (0..8192u32).map(|i| 3 + (i * 7919) % 380).collect();
    let mut cache = model.new_cache(ids.len() + 2).unwrap();
    let out = model.forward(&ids, &mut cache, LogitsFor::Last).unwrap();
    assert!(out.logits[0].iter().all(|v| v.is_finite()));
    let next = argmax(&out.logits[0]);
    let step = model.forward(&[next], &mut cache, LogitsFor::Last).unwrap();
    assert!(step.logits[0].iter().all(|v| v.is_finite()));
    assert_eq!(cache.len(), 8193);
    assert!(cache.page_positions() * 4 < 8193, "the cache spans several pages");
}
