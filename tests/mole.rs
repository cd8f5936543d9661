//! Mixture of Lookup Experts: the lookup-table path equals the FFN-expert path of the same
//! checkpoint, the table holds what a plain-Rust evaluation of the experts gives, and bad tables
//! fail with an error naming the file.
//!
//! Tolerance: logits within 1e-5 of the largest |logit| (f32 table; the two paths differ only in
//! how the GPU batches the experts' matmuls: on lavapipe they are bit-identical), greedy tokens
//! identical.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferry_models::mole::{SMALL, convert_to_lut, write_random};
use ferry_runtime::engine::Engine;
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::lut::{HEADER_BYTES, LUT_FILE, LutDtype};

use crate::support::{gpu, greedy, max_abs_diff};

const PROMPT: [u32; 12] = [5, 17, 300, 42, 42, 7, 381, 0, 99, 17, 250, 5];

/// A random MoLE checkpoint (`ffn/`) and its conversion (`lut/`), made once per test process.
fn models() -> &'static (PathBuf, PathBuf) {
    static MODELS: OnceLock<(tempfile::TempDir, (PathBuf, PathBuf))> = OnceLock::new();
    &MODELS
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let (ffn, lut) = (tmp.path().join("ffn"), tmp.path().join("lut"));
            write_random(&ffn, SMALL, 7).unwrap();
            convert_to_lut(&ffn, &lut, &gpu(), LutDtype::F32, |_, _| {}).unwrap();
            (tmp, (ffn, lut))
        })
        .1
}

fn load(dir: &Path) -> Model {
    let opened = ferry_models::open(dir).unwrap();
    Model::load(opened.spec, &opened.weights, &gpu().device).unwrap()
}

fn all_logits(model: &mut Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(64).unwrap();
    model.forward(ids, &mut cache, LogitsFor::All).unwrap().logits
}

#[test]
fn lut_logits_and_greedy_tokens_equal_ffn_expert_inference() {
    let (ffn_dir, lut_dir) = models();
    let (mut ffn, mut lut) = (load(ffn_dir), load(lut_dir));
    assert!(ffn.lookup_table().is_none() && lut.lookup_table().is_some());
    let (diff, scale) = max_abs_diff(&all_logits(&mut lut, &PROMPT), &all_logits(&mut ffn, &PROMPT));
    eprintln!("LUT vs FFN: largest logit difference {diff:e} (largest logit {scale})");
    assert!(diff <= 1e-5 * scale, "LUT vs FFN logits differ by {diff} (largest logit {scale})");

    let (mut ffn, mut lut) = (Engine::new(ffn, None), Engine::new(lut, None));
    let before = lut.model.lookup_stats();
    let tokens = greedy(&mut lut, &PROMPT, 20);
    assert_eq!(tokens, greedy(&mut ffn, &PROMPT, 20), "greedy tokens");
    // One row per token of each forward pass: the prompt, then 19 decode steps.
    let stats = lut.model.lookup_stats() - before;
    let row_bytes = lut.model.lookup_table().unwrap().row_bytes() as u64;
    assert_eq!(stats.rows_fetched, (PROMPT.len() + 19) as u64);
    assert_eq!(stats.bytes_read, stats.rows_fetched * row_bytes);
    assert_eq!(stats.bytes_uploaded, stats.rows_fetched * row_bytes);
    assert_eq!(ffn.model.lookup_stats().rows_fetched, 0);
}

#[test]
fn row_cache_serves_repeated_tokens_without_changing_logits() {
    let (_, lut_dir) = models();
    let uncached = all_logits(&mut load(lut_dir), &PROMPT);
    let mut model = load(lut_dir);
    model.set_lookup_cache(1 << 20);
    let cached = all_logits(&mut model, &PROMPT);
    assert_eq!(cached, uncached, "the row cache must not change a single bit");
    let s = model.lookup_stats();
    // PROMPT repeats 5, 17 and 42 once each.
    assert_eq!((s.rows_fetched, s.row_cache_hits), (12, 3));
    assert_eq!(s.bytes_read, 9 * model.lookup_table().unwrap().row_bytes() as u64);
}

/// Plain-Rust `down(silu(gate(e)) * up(e))` with `e = rms_norm(embed[id])`, from the checkpoint.
fn cpu_expert(store: &ferry_runtime::weights::WeightStore, layer: usize, expert: usize, id: usize) -> Vec<f32> {
    let (h, i, v) = (SMALL.hidden, SMALL.expert_intermediate, 384);
    let embed = store.f32("model.embed_tokens.weight", &[v, h]).unwrap();
    let norm = store.f32(&format!("model.layers.{layer}.mlp.expert_norm.weight"), &[h]).unwrap();
    let p = format!("model.layers.{layer}.mlp.experts.{expert}");
    let gate = store.f32(&format!("{p}.gate_proj.weight"), &[i, h]).unwrap();
    let up = store.f32(&format!("{p}.up_proj.weight"), &[i, h]).unwrap();
    let down = store.f32(&format!("{p}.down_proj.weight"), &[h, i]).unwrap();
    let x = &embed[id * h..(id + 1) * h];
    let rms = (x.iter().map(|a| a * a).sum::<f32>() / h as f32 + 1e-5).sqrt();
    let e: Vec<f32> = x.iter().zip(&norm).map(|(a, w)| a / rms * w).collect();
    let dot = |w: &[f32], r: usize, x: &[f32]| {
        w[r * x.len()..(r + 1) * x.len()].iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
    };
    let act: Vec<f32> = (0..i)
        .map(|r| {
            let g = dot(&gate, r, &e);
            g / (1.0 + (-g).exp()) * dot(&up, r, &e)
        })
        .collect();
    (0..h).map(|r| dot(&down, r, &act)).collect()
}

#[test]
fn table_rows_equal_a_cpu_evaluation_of_the_expert_ffns() {
    let (ffn_dir, lut_dir) = models();
    let store = ferry_runtime::weights::WeightStore::open(ffn_dir).unwrap();
    let table = std::fs::read(lut_dir.join(LUT_FILE)).unwrap();
    let (h, experts) = (SMALL.hidden, SMALL.experts);
    let row_len = SMALL.layers * experts * h;
    for id in [0usize, 17, 383] {
        for (layer, expert) in [(0, 0), (1, 3), (SMALL.layers - 1, 2)] {
            let start = HEADER_BYTES + (id * row_len + (layer * experts + expert) * h) * 4;
            let stored: Vec<f32> = table[start..start + 4 * h]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let reference = cpu_expert(&store, layer, expert, id);
            let (diff, scale) = max_abs_diff(&[stored], &[reference]);
            eprintln!("token {id} layer {layer} expert {expert}: table vs CPU {diff:e} (largest {scale})");
            assert!(diff <= 1e-5 * scale.max(1e-3), "token {id} layer {layer} expert {expert}: off by {diff}");
        }
    }
}

/// A copy of the converted folder to damage.
fn copy_lut() -> (tempfile::TempDir, PathBuf) {
    let (_, lut_dir) = models();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lut");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(lut_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    let opened = ferry_models::open(dir).unwrap();
    match Model::load(opened.spec, &opened.weights, &gpu().device) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_table_is_an_error_naming_the_file() {
    let (_tmp, dir) = copy_lut();
    let path = dir.join(LUT_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 100).unwrap();
    let message = load_error(&dir);
    assert!(message.contains(LUT_FILE) && message.contains("truncated"), "{message}");
}

#[test]
fn table_whose_header_disagrees_with_the_config_is_an_error_naming_the_file() {
    let (_tmp, dir) = copy_lut();
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(SMALL.layers - 1);
    std::fs::write(&path, config.to_string()).unwrap();
    let message = load_error(&dir);
    assert!(message.contains(LUT_FILE) && message.contains("does not match config.json"), "{message}");
}

#[test]
fn converting_a_converted_folder_is_an_error() {
    let (_, lut_dir) = models();
    let tmp = tempfile::tempdir().unwrap();
    let err = convert_to_lut(lut_dir, &tmp.path().join("again"), &gpu(), LutDtype::F32, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("already converted"), "{err}");
}
