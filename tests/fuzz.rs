//! Bounded fuzzing of the parsers hostile input reaches first: safetensors headers, shard
//! indexes, `config.json` into `ModelSpec`, the option parsers, chat templates and tokenizers.
//! Each property runs a fixed number of seeded cases (seconds in CI); a panic, or an error of
//! more than one line, fails and names the seed and the input. Raise `FERRY_FUZZ_CASES` to
//! search longer.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ferry_runtime::weights::WeightStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::support::{FAMILIES, fixture};

/// Cases per property: `FERRY_FUZZ_CASES`, else `default`.
fn cases(default: usize) -> usize {
    std::env::var("FERRY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `f`, failing with `what` if it panics; an error must be one line.
fn no_panic<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("panicked on {what}"),
        Ok(Err(e)) => {
            let message = e.to_string();
            assert!(!message.contains('\n'), "error of more than one line on {what}: {message:?}");
            None
        }
        Ok(Ok(value)) => Some(value),
    }
}

/// Values that break parsers: wrong types, signs, magnitudes and edge integers.
fn hostile_value(rng: &mut StdRng) -> Value {
    let pool = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1),
        json!(3),
        json!(0.5),
        json!(-0.0),
        json!(1e300),
        json!(-1e300),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("7"),
        json!(""),
        json!("yarn"),
        json!("../../etc/passwd"),
        json!([]),
        json!([1, 2]),
        json!(["sliding_attention"]),
        json!({}),
        json!({"rope_type": "linear", "factor": 0}),
        json!({"rope_type": "yarn", "factor": 1e300}),
        json!({"quant_method": "mxfp4"}),
    ];
    pool[rng.random_range(0..pool.len())].clone()
}

/// A small checkpoint with one tensor of each float dtype.
fn small_safetensors() -> Vec<u8> {
    let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..4).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
    let c: Vec<u8> = (0..2).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
    let views = [
        ("a", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &a).unwrap()),
        ("b", safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![4], &b).unwrap()),
        ("c", safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![1, 2], &c).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// One mutation of a safetensors file: a flipped byte, a truncation, a wrong header length, or
/// a header whose JSON has a hostile dtype, shape or offsets.
fn mutate_safetensors(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match rng.random_range(0..4) {
        0 => {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= 1 << rng.random_range(0..8);
        }
        1 => bytes.truncate(rng.random_range(0..bytes.len())),
        2 => {
            let len: u64 = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => (header_len as u64).saturating_add(rng.random_range(1..64)),
                _ => header_len.saturating_sub(rng.random_range(1..64)) as u64,
            };
            bytes[..8].copy_from_slice(&len.to_le_bytes());
        }
        _ => {
            let Ok(mut header) = serde_json::from_slice::<Value>(&bytes[8..8 + header_len.min(bytes.len() - 8)]) else {
                return;
            };
            let Some(map) = header.as_object_mut() else { return };
            let names: Vec<String> = map.keys().cloned().collect();
            let name = &names[rng.random_range(0..names.len())];
            let field = ["dtype", "shape", "data_offsets"][rng.random_range(0..3)];
            let value = match (field, rng.random_range(0..3)) {
                ("dtype", 0) => json!(["F64", "I8", "U8", "BOOL", "F8_E4M3", "X"][rng.random_range(0..6)]),
                ("shape", 0) => json!([u64::MAX, 2]),
                ("shape", 1) => json!([rng.random_range(0..9u64), rng.random_range(0..9u64)]),
                ("data_offsets", 0) => json!([rng.random_range(0..64u64), rng.random_range(0..64u64)]),
                ("data_offsets", 1) => json!([0, u64::MAX]),
                _ => hostile_value(rng),
            };
            map.entry(name.clone()).or_insert(json!({}))[field] = value;
            let text = header.to_string();
            let data = bytes[header_len.saturating_add(8).min(bytes.len())..].to_vec();
            *bytes = [(text.len() as u64).to_le_bytes().to_vec(), text.into_bytes(), data].concat();
        }
    }
}

/// Whatever a mutated file opens as, reading each tensor it lists neither panics nor reads out
/// of bounds.
fn read_every_tensor(store: &WeightStore) {
    for name in store.names() {
        let tensor = store.tensor(name).unwrap().clone();
        assert_eq!(store.bytes(&tensor).len(), tensor.byte_len());
        let _ = store.f32(name, &tensor.shape);
    }
}

#[test]
fn malformed_safetensors_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let base = small_safetensors();
    for seed in 0..cases(2000) as u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = base.clone();
        for _ in 0..rng.random_range(1..4) {
            if bytes.len() >= 8 {
                mutate_safetensors(&mut bytes, &mut rng);
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let what = format!("safetensors seed {seed} ({} bytes)", bytes.len());
        if let Some(store) = no_panic(&what, || WeightStore::open(tmp.path())) {
            no_panic(&what, || {
                read_every_tensor(&store);
                Ok::<(), String>(())
            });
        }
    }
}

/// A hostile weight_map entry or index shape.
fn mutate_index(index: &mut Value, shards: &[String], rng: &mut StdRng) {
    if !index.get("weight_map").is_some_and(Value::is_object) {
        *index = json!({ "weight_map": hostile_value(rng) });
        return;
    }
    let names: Vec<String> = index["weight_map"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    match rng.random_range(0..5) {
        0 if !names.is_empty() => {
            let file = ["../x.safetensors", "/dev/null", "", ".", "sub/../model.safetensors", "missing.safetensors"];
            let value = if rng.random_bool(0.5) {
                json!(file[rng.random_range(0..file.len())])
            } else {
                json!(shards[rng.random_range(0..shards.len())])
            };
            index["weight_map"][&names[rng.random_range(0..names.len())]] = value;
        }
        1 if !names.is_empty() => {
            index["weight_map"].as_object_mut().unwrap().remove(&names[rng.random_range(0..names.len())]);
        }
        2 => index["weight_map"]["not.a.tensor"] = json!(shards[rng.random_range(0..shards.len())]),
        3 => index["weight_map"] = hostile_value(rng),
        4 if !names.is_empty() => index["weight_map"][&names[rng.random_range(0..names.len())]] = hostile_value(rng),
        _ => *index = hostile_value(rng),
    }
}

#[test]
fn malformed_shard_indexes_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(fixture("mixtral")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            std::fs::copy(entry.path(), tmp.path().join(&name)).unwrap();
            shards.push(name);
        }
    }
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let original: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mixtral").join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let index_path = tmp.path().join("model.safetensors.index.json");
    for seed in 0..cases(300) as u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut index = original.clone();
        for _ in 0..rng.random_range(1..4) {
            mutate_index(&mut index, &shards, &mut rng);
        }
        std::fs::write(&index_path, index.to_string()).unwrap();
        if let Some(store) = no_panic(&format!("index seed {seed}: {index}"), || WeightStore::open(tmp.path())) {
            read_every_tensor(&store);
        }
    }
}

/// Every key a family reads, beside those the fixture's config already has.
const CONFIG_KEYS: [&str; 24] = [
    "head_dim",
    "sliding_window",
    "clip_qkv",
    "q_lora_rank",
    "kv_lora_rank",
    "n_group",
    "topk_group",
    "topk_method",
    "layer_types",
    "mlp_only_layers",
    "decoder_sparse_step",
    "first_k_dense_replace",
    "n_shared_experts",
    "swiglu_limit",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "eos_token_id",
    "bos_token_id",
    "quantization_config",
    "architectures",
    "hidden_act",
    "norm_topk_prob",
    "shared_expert_intermediate_size",
];

fn mutate_config(config: &mut Value, rng: &mut StdRng) {
    let map = config.as_object_mut().unwrap();
    let mut keys: Vec<String> = map.keys().cloned().collect();
    keys.extend(CONFIG_KEYS.iter().map(|k| k.to_string()));
    let key = keys[rng.random_range(0..keys.len())].clone();
    match rng.random_range(0..4) {
        0 => {
            map.remove(&key);
        }
        // Inside a nested object (rope_scaling, quantization_config), when there is one.
        1 if map.get(&key).is_some_and(Value::is_object) => {
            let inner = map[&key].as_object_mut().unwrap();
            let mut inner_keys: Vec<String> = inner.keys().cloned().collect();
            inner_keys
                .extend(["factor", "rope_type", "original_max_position_embeddings", "rope_theta"].map(String::from));
            let inner_key = inner_keys[rng.random_range(0..inner_keys.len())].clone();
            inner.insert(inner_key, hostile_value(rng));
        }
        _ => {
            map.insert(key, hostile_value(rng));
        }
    }
}

/// A spec that loads must allow its own size arithmetic (parameter counts, KV cache sizes).
fn use_sizes(spec: &ferry_runtime::spec::ModelSpec) {
    let _ = spec.resident_params() + spec.expert_params_total() + spec.gpu_resident_params() + spec.projection_params();
    let _ = spec.attention.kv_elements(spec.num_layers(), spec.max_position_embeddings.min(4096));
    let _ = spec.attention.kv_elements_per_token_expanded();
}

#[test]
fn mutated_configs_are_errors_naming_config_json_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let per_family = cases(500);
    for family in FAMILIES {
        let original: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(family).join("config.json")).unwrap()).unwrap();
        for seed in 0..per_family as u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut config = original.clone();
            for _ in 0..rng.random_range(1..4) {
                mutate_config(&mut config, &mut rng);
            }
            std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
            let what = format!("{family} config seed {seed}: {config}");
            match catch_unwind(|| ferry_models::read_spec(tmp.path())) {
                Err(_) => panic!("panicked on {what}"),
                Ok(Err(e)) => {
                    let message = e.to_string();
                    assert!(!message.contains('\n') && message.contains("config.json"), "{what}: {message:?}");
                }
                Ok(Ok(spec)) => {
                    no_panic(&what, || {
                        use_sizes(&spec);
                        Ok::<(), String>(())
                    });
                }
            }
        }
    }
}

/// Random short strings through the option parsers that flags use.
#[test]
fn option_parsers_take_any_string() {
    use ferry_runtime::options::{AdapterChoice, ByteSize, VramBudget};
    let alphabet: Vec<char> = "0123456789.-+eE%:kKmMgGiIbBTtaAdiscretl \u{e9}\u{1F600}".chars().collect();
    for seed in 0..cases(5000) as u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let text: String =
            (0..rng.random_range(0..12)).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
        let what = format!("option text {text:?}");
        no_panic(&what, || text.parse::<ByteSize>().map_err(|e| e.to_string()));
        no_panic(&what, || text.parse::<VramBudget>().map_err(|e| e.to_string()));
        no_panic(&what, || text.parse::<AdapterChoice>().map_err(|e| e.to_string()));
    }
}

/// Random conversations through every fixture's chat template and tokenizer, and random ids
/// (beyond the tokenizer's vocabulary too, as a model with a larger vocab_size samples them)
/// through decoding.
#[test]
fn random_conversations_and_ids_through_templates_and_tokenizers() {
    let pieces =
        ["hi", " ", "\n", "{{ x }}", "{% if %}", "<|im_end|>", "\u{e9}", "\u{65e5}\u{672c}", "\u{1F600}", "\0"];
    let roles = ["user", "assistant", "system", "tool", ""];
    for family in FAMILIES {
        let tokenizer = ferry_runtime::chat::ChatTokenizer::open(&fixture(family)).unwrap();
        let vocab = tokenizer.vocab_size() as u32;
        for seed in 0..cases(300) as u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let text = |rng: &mut StdRng| -> String {
                (0..rng.random_range(0..8)).map(|_| pieces[rng.random_range(0..pieces.len())]).collect()
            };
            let messages: Vec<ferry_runtime::chat::Message> = (0..rng.random_range(0..4))
                .map(|_| {
                    let role = roles[rng.random_range(0..roles.len())];
                    ferry_runtime::chat::Message::new(role, &text(&mut rng))
                })
                .collect();
            let what = format!("{family} seed {seed}: {messages:?}");
            no_panic(&what, || tokenizer.encode_chat(&messages));
            let ids: Vec<u32> = (0..rng.random_range(0..16)).map(|_| rng.random_range(0..vocab * 2)).collect();
            no_panic(&format!("{family} decoding {ids:?}"), || tokenizer.decode(&ids));
        }
    }
}
