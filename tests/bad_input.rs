//! Bad input gives a clear error naming the file, tensor or flag, never a panic.

use std::path::{Path, PathBuf};

use ferry_runtime::engine::{Engine, GenerateRequest};
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::sampling::SamplingConfig;

use crate::support::{fixture, gpu};

/// A writable copy of a fixture folder.
fn copy_fixture(family: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(family);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

/// Opens and loads the folder, returning the error message it must produce.
fn load_error(dir: &Path) -> String {
    let result = ferry_models::open(dir).and_then(|opened| Model::load(opened.spec, &opened.weights, &gpu().device));
    match result {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error {message:?} does not mention {part:?}");
    }
    assert!(!message.contains('\n'), "error should be one line: {message:?}");
}

#[test]
fn missing_config_names_config_json() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&load_error(&dir), &["config.json"]);
}

#[test]
fn missing_model_folder_names_the_folder() {
    let message = load_error(Path::new("/nonexistent/ferry-model"));
    assert_mentions(&message, &["/nonexistent/ferry-model", "does not exist"]);
}

#[test]
fn missing_weights_name_model_safetensors() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors"]);
}

#[test]
fn missing_shard_names_the_shard() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("model-0000") && n.ends_with(".safetensors"))
        .expect("mixtral fixture is sharded");
    std::fs::remove_file(dir.join(&shard)).unwrap();
    assert_mentions(&load_error(&dir), &[&shard]);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "truncated"]);
}

#[test]
fn unknown_architecture_is_named_with_the_supported_ones() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["architectures"] = serde_json::json!(["LlamaForCausalLM"]));
    assert_mentions(&load_error(&dir), &["config.json", "LlamaForCausalLM", "MixtralForCausalLM"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    // One more layer than the checkpoint has.
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(c["num_hidden_layers"].as_u64().unwrap() + 1));
    let layers = ferry_models::read_spec(&dir).unwrap().num_layers();
    assert_mentions(&load_error(&dir), &[&format!("model.layers.{}.", layers - 1), "not found"]);
}

#[test]
fn shape_that_disagrees_with_the_config_names_the_tensor() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| {
        c["moe_intermediate_size"] = serde_json::json!(c["moe_intermediate_size"].as_u64().unwrap() * 2)
    });
    assert_mentions(&load_error(&dir), &["mlp.experts.0.gate_proj.weight", "shape", "model.safetensors"]);
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    let data = [0u8; 16];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![4], &data).unwrap();
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &dir.join("model.safetensors"))
        .unwrap();
    assert_mentions(&load_error(&dir), &["model.embed_tokens.weight", "I32", "model.safetensors"]);
}

#[test]
fn inconsistent_config_names_the_keys() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["num_experts_per_tok"] = serde_json::json!(99));
    assert_mentions(&load_error(&dir), &["config.json", "num_experts_per_tok"]);
    edit_config(&dir, |c| c["num_experts_per_tok"] = serde_json::json!("two"));
    assert_mentions(&load_error(&dir), &["config.json", "num_experts_per_tok"]);
}

fn fixture_engine(dir: &Path) -> Engine {
    let opened = ferry_models::open(dir).unwrap();
    Engine::new(Model::load(opened.spec, &opened.weights, &gpu().device).unwrap(), None)
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    let mut engine = fixture_engine(&fixture("qwen3_moe"));
    let vocab = engine.model.spec().vocab_size as u32;
    let mut cache = engine.model.new_cache(4).unwrap();
    let err = engine.model.forward(&[1, vocab + 5], &mut cache, LogitsFor::Last).err().expect("must fail").to_string();
    assert_mentions(&err, &[&(vocab + 5).to_string(), "vocabulary"]);
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(8));
    let mut engine = fixture_engine(&dir);
    let request = GenerateRequest {
        prompt_ids: vec![5; 12],
        max_new_tokens: 4,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: true,
    };
    let err = engine.generate(&request, |_| {}).expect_err("must fail").to_string();
    assert_mentions(&err, &["12 tokens", "context of 8"]);
}

#[test]
fn generation_stops_at_the_context_limit() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(8));
    let mut engine = fixture_engine(&dir);
    let request = GenerateRequest {
        prompt_ids: vec![5; 6],
        max_new_tokens: 10,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    };
    let output = engine.generate(&request, |_| {}).unwrap();
    assert_eq!(output.ids.len(), 2);
    assert_eq!(output.stats.stop_reason, ferry_runtime::engine::StopReason::Context);
}

#[test]
fn inconsistent_mla_keys_are_named() {
    let (_tmp, dir) = copy_fixture("deepseek_v3");
    edit_config(&dir, |c| c["head_dim"] = serde_json::json!(5));
    assert_mentions(&load_error(&dir), &["config.json", "head_dim (5)", "qk_rope_head_dim"]);
    edit_config(&dir, |c| {
        c["head_dim"] = serde_json::Value::Null;
        c["qk_rope_head_dim"] = serde_json::json!(7);
    });
    assert_mentions(&load_error(&dir), &["config.json", "qk_rope_head_dim (7)", "even"]);
    edit_config(&dir, |c| {
        c["qk_rope_head_dim"] = serde_json::json!(8);
        c["n_group"] = serde_json::json!(5);
    });
    assert_mentions(&load_error(&dir), &["config.json", "n_routed_experts (16)", "n_group (5)"]);
}

#[test]
fn inconsistent_yarn_keys_are_named() {
    let (_tmp, dir) = copy_fixture("deepseek_v2");
    edit_config(&dir, |c| c["rope_scaling"]["original_max_position_embeddings"] = serde_json::json!(1024));
    assert_mentions(&load_error(&dir), &["config.json", "original_max_position_embeddings (1024)"]);
    edit_config(&dir, |c| {
        c["rope_scaling"]["original_max_position_embeddings"] = serde_json::json!(64);
        c["rope_scaling"]["factor"] = serde_json::json!("four");
    });
    assert_mentions(&load_error(&dir), &["config.json", "yarn", "factor"]);
}

#[test]
fn gpt_oss_layer_types_must_cover_every_layer() {
    let (_tmp, dir) = copy_fixture("gpt_oss");
    edit_config(&dir, |c| c["layer_types"] = serde_json::json!(["sliding_attention"]));
    assert_mentions(&load_error(&dir), &["config.json", "layer_types has 1 entries"]);
}

/// MXFP4 scales that do not cover their blocks one for one name both tensors.
#[test]
fn mxfp4_blocks_and_scales_that_disagree_are_named() {
    let (_tmp, dir) = copy_fixture("gpt_oss");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bad = "model.layers.0.mlp.experts.gate_up_proj_scales";
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            if name != bad {
                return (name, view);
            }
            // One block group fewer per row: same bytes, a shape that no longer matches.
            let mut shape = view.shape().to_vec();
            let last = shape.len() - 1;
            let rows: usize = shape[..last].iter().product();
            shape[last] -= 1;
            let data = &view.data()[..rows * shape[last]];
            (name, safetensors::tensor::TensorView::new(view.dtype(), shape, data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    assert_mentions(&load_error(&dir), &[bad, "gate_up_proj_blocks"]);
}
