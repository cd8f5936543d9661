//! Bad input gives a clear error naming the file, tensor or flag, never a panic.

use std::path::Path;

use ferry_runtime::engine::{Engine, GenerateRequest, Generation};
use ferry_runtime::graph::{LogitsFor, Model};
use ferry_runtime::options::{BigFallback, BigLittle, ExpertOptions, Importance};
use ferry_runtime::sampling::SamplingConfig;

use crate::support::{copy_fixture, edit_config, edit_tensors, fixture, gpu};

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

#[test]
fn absurd_layer_counts_and_widths_are_range_errors_not_aborts() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(1u64 << 40));
    assert_mentions(&load_error(&dir), &["config.json", "num_hidden_layers", "4294967295"]);
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(4_000_000_000u64));
    assert_mentions(&load_error(&dir), &["config.json", "num_hidden_layers must be in 1..=4096"]);
    edit_config(&dir, |c| {
        c["num_hidden_layers"] = serde_json::json!(3);
        c["hidden_size"] = serde_json::json!(u64::MAX);
    });
    assert_mentions(&load_error(&dir), &["config.json", "hidden_size", "4294967295"]);
    edit_config(&dir, |c| c["hidden_size"] = serde_json::json!(1u64 << 31));
    assert_mentions(&load_error(&dir), &["config.json", "hidden_size must be at most 1048576"]);
}

#[test]
fn architectures_given_as_a_string_says_it_must_be_a_list() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["architectures"] = serde_json::json!("Qwen3MoeForCausalLM"));
    assert_mentions(&load_error(&dir), &["config.json", "\"architectures\" must be a list"]);
}

#[test]
fn nonsense_config_values_name_the_key_and_the_range() {
    let cases: [(&str, &str, serde_json::Value, &[&str]); 12] = [
        ("qwen3_moe", "rms_norm_eps", serde_json::json!(-1.0), &["rms_norm_eps", "(0, 0.1]"]),
        ("qwen3_moe", "rms_norm_eps", serde_json::json!(1e300), &["rms_norm_eps", "f32's range"]),
        ("qwen3_moe", "rope_theta", serde_json::json!(0), &["rope_theta", "(0, 1e12]"]),
        ("qwen3_moe", "rope_theta", serde_json::json!(-5.0), &["rope_theta", "(0, 1e12]"]),
        ("qwen3_moe", "rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 0}), &["linear", "factor"]),
        ("qwen3_moe", "rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 1e300}), &["factor"]),
        ("qwen3_moe", "rope_scaling", serde_json::json!("yarn"), &["rope_scaling must be an object"]),
        ("deepseek_v2", "rope_scaling", serde_json::json!(4), &["rope_scaling must be an object"]),
        ("mixtral", "sliding_window", serde_json::json!(0), &["sliding_window must be positive"]),
        ("olmoe", "clip_qkv", serde_json::json!(0), &["clip_qkv must be a positive number"]),
        ("olmoe", "clip_qkv", serde_json::json!(-1.5), &["clip_qkv must be a positive number"]),
        ("qwen3_moe", "eos_token_id", serde_json::json!((1u64 << 32) + 5), &["eos_token_id", "4294967301"]),
    ];
    for (family, key, value, parts) in cases {
        let (_tmp, dir) = copy_fixture(family);
        edit_config(&dir, |c| c[key] = value.clone());
        let message = load_error(&dir);
        assert_mentions(&message, &[&["config.json"], parts].concat());
    }
}

#[test]
fn a_gpt_oss_mxfp4_config_with_odd_sizes_blames_the_config_not_a_flag() {
    let (_tmp, dir) = copy_fixture("gpt_oss");
    edit_config(&dir, |c| c["intermediate_size"] = serde_json::json!(48));
    let message = load_error(&dir);
    assert_mentions(&message, &["config.json", "mxfp4", "intermediate_size (48)"]);
    assert!(!message.contains("--expert-dtype"), "{message}");
}

#[test]
fn a_model_path_that_is_a_file_says_it_is_not_a_folder() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    assert_mentions(&load_error(&dir.join("config.json")), &["config.json", "not a folder"]);
    assert_mentions(&load_error(Path::new("/dev/null")), &["/dev/null", "not a folder"]);
}

#[test]
fn a_weights_path_that_is_a_folder_says_so() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "a folder; expected a file"]);
}

/// Opening a FIFO blocks until a writer comes; the load must refuse it at once.
#[test]
fn a_weights_path_that_is_a_fifo_is_refused_without_blocking() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    let path = dir.join("model.safetensors");
    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&path).status().expect("mkfifo runs");
    assert!(made.success());
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(ferry_models::open(&dir).err().map(|e| e.to_string()));
    });
    let message = receive.recv_timeout(std::time::Duration::from_secs(60)).expect("the load hung on a FIFO");
    assert_mentions(&message.expect("a FIFO must not load"), &["model.safetensors", "not a regular file"]);
}

/// Rewrites the mixtral fixture's shard index.
fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(index["weight_map"].as_object_mut().unwrap());
    std::fs::write(&path, index.to_string()).unwrap();
}

#[test]
fn an_empty_weight_map_is_named() {
    let (_tmp, dir) = copy_fixture("mixtral");
    edit_index(&dir, |map| map.clear());
    assert_mentions(&load_error(&dir), &["model.safetensors.index.json", "weight_map is empty"]);
}

#[test]
fn index_paths_that_leave_the_model_folder_are_refused() {
    for outside in ["../model-00001-of-00003.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let (_tmp, dir) = copy_fixture("mixtral");
        edit_index(&dir, |map| {
            map.insert("lm_head.weight".into(), serde_json::json!(outside));
        });
        assert_mentions(&load_error(&dir), &["model.safetensors.index.json", "lm_head.weight", "not a file inside"]);
    }
}

#[test]
fn an_index_entry_whose_shard_lacks_the_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let mut moved = String::new();
    edit_index(&dir, |map| {
        let lm_head = map["lm_head.weight"].as_str().unwrap().to_string();
        let other = map.values().map(|v| v.as_str().unwrap().to_string()).find(|f| *f != lm_head).unwrap();
        moved = other.clone();
        map.insert("lm_head.weight".into(), serde_json::json!(other));
    });
    assert_mentions(&load_error(&dir), &["model.safetensors.index.json", "lm_head.weight", &moved, "does not hold it"]);
}

#[test]
fn a_tensor_defined_in_two_shards_is_named() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let home = index["weight_map"]["lm_head.weight"].as_str().unwrap().to_string();
    let other = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|f| *f != home)
        .unwrap();
    // Append a copy of lm_head.weight to another shard.
    let extra = std::fs::read(dir.join(&home)).unwrap();
    let extra = safetensors::SafeTensors::deserialize(&extra).unwrap();
    let head = extra.tensor("lm_head.weight").unwrap();
    let bytes = std::fs::read(dir.join(&other)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views = tensors.tensors();
    views.push(("lm_head.weight".to_string(), head));
    safetensors::serialize_to_file(views, None, &dir.join(&other)).unwrap();
    assert_mentions(&load_error(&dir), &["lm_head.weight", "is also in", "defined once"]);
}

#[test]
fn non_finite_weights_name_the_tensor() {
    for (name, value) in [("model.norm.weight", f32::NAN), ("lm_head.weight", f32::INFINITY)] {
        let (_tmp, dir) = copy_fixture("qwen3_moe");
        edit_tensors(&dir, |n| n == name, |values| values[3] = value);
        assert_mentions(&load_error(&dir), &["model.safetensors", name, "element 3", "finite"]);
    }
}

fn greedy_request(n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![5, 6, 7],
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    }
}

/// Finite weights whose products overflow, and NaN experts (converted on first use, after the
/// load's scan), stop generation with an error naming the step instead of sampling from NaN.
#[test]
fn non_finite_logits_stop_generation_with_an_error() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_tensors(&dir, |n| n == "model.norm.weight" || n == "lm_head.weight", |values| values.fill(3e38));
    let err = fixture_engine(&dir).generate(&greedy_request(2), |_| {}).expect_err("must fail").to_string();
    assert_mentions(&err, &["step 0", "logits"]);
}

/// Routed experts are converted when first uploaded (all at load when every expert is
/// resident, on a miss otherwise); a NaN there names the layer, expert and projection. (Layer 1
/// of the fixture is dense.)
#[test]
fn a_non_finite_expert_is_named_when_first_uploaded() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_tensors(&dir, |n| n == "model.layers.2.mlp.experts.3.up_proj.weight", |values| values[5] = f32::NAN);
    assert_mentions(&load_error(&dir), &["layer 2, routed expert 3", "up projection", "NaN at element 5"]);
    // Offloaded: every expert of layer 2 is bad, so the first one a miss uploads is named.
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_tensors(
        &dir,
        |n| n.starts_with("model.layers.2.mlp.experts.") && n.ends_with("up_proj.weight"),
        |values| values[5] = f32::INFINITY,
    );
    let opened = ferry_models::open(&dir).unwrap();
    let options = ferry_runtime::options::ExpertOptions {
        budget: ferry_runtime::options::VramBudget::FractionOfExperts(0.25),
        ..Default::default()
    };
    let result = Model::load_with(opened.spec, &opened.weights, &gpu().device, options)
        .and_then(|model| Engine::new(model, None).generate(&greedy_request(4), |_| {}));
    let err = result.expect_err("the bad experts are used").to_string();
    assert_mentions(&err, &["layer 2, routed expert", "up projection", "inf at element 5"]);
    // Kept at bf16 width, the check reads the packed words.
    let opened = ferry_models::open(&dir).unwrap();
    let options = ferry_runtime::options::ExpertOptions {
        expert_dtype: ferry_runtime::options::ExpertDtype::Bf16,
        ..Default::default()
    };
    let err = Model::load_with(opened.spec, &opened.weights, &gpu().device, options)
        .err()
        .map(|e| e.to_string())
        .expect("bf16 experts with an Inf must not load");
    assert_mentions(&err, &["layer 2, routed expert 0", "up projection", "inf at element 5"]);
    // Quantised, a NaN weight makes its group's scale NaN (it is not rounded to a plausible code).
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_tensors(&dir, |n| n == "model.layers.2.mlp.experts.3.up_proj.weight", |values| values[5] = f32::NAN);
    let opened = ferry_models::open(&dir).unwrap();
    let options = ferry_runtime::options::ExpertOptions {
        expert_dtype: ferry_runtime::options::ExpertDtype::Int8,
        ..Default::default()
    };
    let err = Model::load_with(opened.spec, &opened.weights, &gpu().device, options)
        .err()
        .map(|e| e.to_string())
        .expect("int8 experts quantised from a NaN must not load");
    assert_mentions(&err, &["layer 2, routed expert 3", "up projection"]);
}

/// A `--max-new-tokens` of usize::MAX means "until the context is full", not an overflow.
#[test]
fn the_largest_max_new_tokens_runs_to_the_context() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(8));
    let output = fixture_engine(&dir).generate(&greedy_request(usize::MAX), |_| {}).unwrap();
    assert_eq!(output.ids.len(), 5);
    assert_eq!(output.stats.stop_reason, ferry_runtime::engine::StopReason::Context);
}

fn with_template(template: &str) -> (tempfile::TempDir, ferry_runtime::chat::ChatTokenizer) {
    let (tmp, dir) = copy_fixture("olmoe");
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = serde_json::json!(template);
    std::fs::write(&path, config.to_string()).unwrap();
    (tmp, ferry_runtime::chat::ChatTokenizer::open(&dir).unwrap())
}

#[test]
fn a_chat_template_that_loops_for_ever_runs_out_of_fuel() {
    let (_tmp, tokenizer) =
        with_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
    let messages = [ferry_runtime::chat::Message::new("user", "hi")];
    let err = tokenizer.encode_chat(&messages).expect_err("must fail").to_string();
    assert_mentions(&err, &["chat template", "steps"]);
}

#[test]
fn a_chat_template_that_renders_a_huge_string_is_an_error() {
    let (_tmp, tokenizer) = with_template("{% for i in range(200) %}{{ 'x' * 1000000 }}{% endfor %}");
    let messages = [ferry_runtime::chat::Message::new("user", "hi")];
    let err = tokenizer.encode_chat(&messages).expect_err("must fail").to_string();
    assert_mentions(&err, &["chat template", "rendered conversation passed"]);
}

/// The built-in model's cache heals: a truncated or deleted file is written again, temp
/// folders of killed runs go, and an empty FERRY_CACHE is no cache folder.
#[test]
fn the_default_model_cache_rewrites_damaged_copies_and_removes_stale_temps() {
    use ferry_models::random_model::{cache_dir_from, ensure_in};
    let tmp = tempfile::tempdir().unwrap();
    let dir = ensure_in(tmp.path()).unwrap();
    let weights = dir.join("model.safetensors");
    let size = std::fs::metadata(&weights).unwrap().len();
    std::fs::write(&weights, b"truncated").unwrap();
    assert_eq!(ensure_in(tmp.path()).unwrap(), dir);
    assert_eq!(std::fs::metadata(&weights).unwrap().len(), size, "a truncated copy is rewritten");
    std::fs::remove_file(&weights).unwrap();
    ensure_in(tmp.path()).unwrap();
    assert_eq!(std::fs::metadata(&weights).unwrap().len(), size, "a deleted file is rewritten");
    let stale = dir.with_extension("tmp4242");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("config.json"), b"{").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::open(&stale).unwrap().set_modified(old).unwrap();
    ensure_in(tmp.path()).unwrap();
    assert!(!stale.exists(), "a stale temp folder is removed");
    let entries: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, [dir.file_name().unwrap()], "nothing else is left in the cache");
    ferry_models::open(&dir).expect("the healed copy loads");

    let env = |empty: &'static str| {
        move |name: &str| match name {
            "FERRY_CACHE" => Some(empty.into()),
            "HOME" => Some("/home/u".into()),
            _ => None,
        }
    };
    assert_eq!(cache_dir_from(env("")).unwrap(), Path::new("/home/u/.cache/ferry"));
    assert_eq!(cache_dir_from(env("/c")).unwrap(), Path::new("/c"));
}

/// A context whose KV layer is larger than any binding is paged, not refused; a prompt beyond
/// the context reserved in GPU memory is refused before any work, and so is `--importance
/// attention` on a prompt whose probabilities could not be bound.
#[test]
fn contexts_beyond_a_binding_are_paged_and_beyond_the_reservation_refused() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = serde_json::json!(1 << 24));
    let mut engine = fixture_engine(&dir);
    // 16M positions, 4 GiB per layer: pages, each within a binding, allocated as reached.
    let generation = Generation::new(&engine.model, greedy_request(usize::MAX)).expect("a paged cache");
    drop(generation);
    let cache = engine.model.new_cache(1 << 24).unwrap();
    assert_eq!(cache.bytes(), 0, "nothing is allocated before it is reached");
    let a = &engine.model.spec().attention;
    let page_bytes = (cache.page_positions() * a.num_kv_heads * a.head_dim * 4) as u64;
    assert!(page_bytes <= gpu().adapter.max_storage_buffer_binding_size, "a page fits one binding");
    // A context reserved for 4096 tokens refuses a longer prompt before any work, naming it.
    let options = ExpertOptions { kv_tokens: Some(4096), ..Default::default() };
    engine.model.set_expert_options(options).unwrap();
    let request = GenerateRequest { prompt_ids: vec![5; 200_000], ..greedy_request(1) };
    let err = engine.generate(&request, |_| {}).expect_err("must fail").to_string();
    assert_mentions(&err, &["200000 tokens", "4096 tokens of KV cache", "--max-context", "--vram-budget"]);
    // `--importance attention`'s probabilities grow with the context: refused before the pass.
    let big_little = BigLittle { importance: Importance::Attention, big_fraction: 0.5, fallback: BigFallback::Fetch };
    let options = ExpertOptions { big_little: Some(big_little), ..Default::default() };
    engine.model.set_expert_options(options).unwrap();
    // 4 heads x 512 queries x 10M keys in f32: 82 GB, beyond any adapter's binding.
    let mut cache = engine.model.new_cache(10_000_000).unwrap();
    let err =
        engine.model.forward(&vec![5; 10_000_000], &mut cache, LogitsFor::Last).err().expect("must fail").to_string();
    assert_mentions(&err, &["attention probabilities for 512 tokens over 10000000 positions", "bytes in one buffer"]);
    assert_eq!(cache.len(), 0, "nothing ran");
}

/// The embedding is read row by row, never scanned whole: a NaN row is named when a token
/// uses it.
#[test]
fn a_non_finite_embedding_row_is_named_when_used() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    let hidden = ferry_models::read_spec(&dir).unwrap().hidden_size;
    edit_tensors(&dir, |n| n == "model.embed_tokens.weight", |values| values[6 * hidden + 2] = f32::NAN);
    let mut engine = fixture_engine(&dir);
    let err = engine.generate(&greedy_request(1), |_| {}).expect_err("must fail").to_string();
    assert_mentions(&err, &["model.embed_tokens.weight", "row 6", "NaN"]);
}

/// The other files a folder names (tokenizer, its config, generation config) are refused as
/// FIFOs too, without blocking.
#[test]
fn folder_files_that_are_fifos_are_refused_without_blocking() {
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let (_tmp, dir) = copy_fixture("olmoe");
        let path = dir.join(name);
        std::fs::remove_file(&path).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&path).status().expect("mkfifo runs").success());
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let spec = ferry_models::read_spec(&dir).err().map(|e| e.to_string());
            let tokenizer = ferry_runtime::chat::ChatTokenizer::open(&dir).err().map(|e| e.to_string());
            let _ = send.send(spec.or(tokenizer));
        });
        let message = receive.recv_timeout(std::time::Duration::from_secs(60)).expect("hung on a FIFO");
        assert_mentions(&message.expect("a FIFO must be refused"), &[name, "not a regular file"]);
    }
}
