//! The `ferry` binary as a user runs it: its JSON contracts against the transformers fixtures,
//! and one-line errors with a non-zero exit for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::support::fixture;

pub(crate) fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().expect("ferry runs")
}

pub(crate) fn json_of(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "ferry failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

/// The error line ferry printed (wgpu's GL probe may print unrelated lines first).
pub(crate) fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "ferry should have failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("error: ") && !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line expected in {stderr:?}");
    lines[0].to_string()
}

fn ids_arg(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn reference(family: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(family).join("reference.json")).unwrap()).unwrap()
}

fn as_ids(value: &serde_json::Value) -> Vec<u64> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[test]
fn logits_command_prints_the_contract_matching_transformers() {
    let reference = reference("qwen2_moe");
    let ids = ids_arg(&as_ids(&reference["input_ids"]));
    let model = fixture("qwen2_moe");
    let out =
        json_of(&ferry(&["logits", "--model", model.to_str().unwrap(), "--ids", &ids, "--all-positions", "--routing"]));
    assert_eq!(out["routing"], reference["routing"]);
    let ours = out["logits"].as_array().unwrap();
    let theirs = reference["logits"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(theirs) {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 2e-4);
        }
    }
    // Without --all-positions: only the last position; without --routing: no routing key.
    let last = json_of(&ferry(&["logits", "--model", model.to_str().unwrap(), "--ids", &ids]));
    assert_eq!(last["logits"].as_array().unwrap().len(), 1);
    assert!(last.get("routing").is_none());
}

#[test]
fn generate_json_gives_transformers_greedy_tokens() {
    let reference = reference("mixtral");
    let prompt = ids_arg(&as_ids(&reference["greedy"]["prompt_ids"]));
    let expected = as_ids(&reference["greedy"]["new_ids"]);
    let model = fixture("mixtral");
    let n = expected.len().to_string();
    let out = json_of(&ferry(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &prompt,
        "--greedy",
        "--ignore-eos",
        "--max-new-tokens",
        &n,
        "--json",
    ]));
    assert_eq!(as_ids(&out["ids"]), expected);
    assert!(out["stats"]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(out["adapter"]["name"].is_string());
}

#[test]
fn generate_streams_text_for_a_prompt() {
    let model = fixture("olmoe");
    let out = ferry(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The robot",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 new"));
}

#[test]
fn info_reports_family_and_expert_bytes() {
    let out = json_of(&ferry(&["info", "--model", fixture("qwen3_moe").to_str().unwrap(), "--json"]));
    assert_eq!(out["family"], "qwen3_moe");
    assert_eq!(out["layers"], 3);
    assert_eq!(out["moe_layers"], 2);
    // 2 MoE layers x 8 experts x 3 x 64 x 32 parameters.
    assert_eq!(out["expert_parameters"], 2 * 8 * 3 * 64 * 32);
}

/// `bench --rounds` measures each mode that many times and reports the median run, and the
/// offloaded mode's greedy tokens equal all-resident's.
#[test]
fn bench_reports_every_round_and_their_median() {
    let model = fixture("mixtral");
    let args = ["bench", "--model", model.to_str().unwrap(), "--vram-budget", "25%", "--prompt-len", "4"];
    let out = json_of(&ferry(&[&args[..], &["--gen-len", "4", "--rounds", "3", "--json"]].concat()));
    assert_eq!(out["greedy_tokens_identical_across_exact_modes"], true);
    let modes = out["modes"].as_array().unwrap();
    assert_eq!(modes.iter().map(|m| m["mode"].as_str().unwrap()).collect::<Vec<_>>(), ["resident", "offload"]);
    for m in modes {
        let mut runs: Vec<f64> =
            m["decode_tokens_per_second_runs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(runs.len(), 3, "{}: one decode figure per round", m["mode"]);
        runs.sort_by(f64::total_cmp);
        assert_eq!(m["decode_tokens_per_second"].as_f64().unwrap(), runs[1], "{}: the median run", m["mode"]);
    }
    assert!(modes[1]["hit_rate"].as_f64().unwrap() < 1.0, "a 25% budget misses");
}

/// The family figures: MLA's KV bytes per token against expanded keys and values (as the
/// fixture's reference computed them), and GPT-OSS's MXFP4 experts, which `--expert-dtype auto`
/// keeps in MXFP4.
#[test]
fn info_reports_mla_kv_bytes_and_the_expert_format() {
    let out = json_of(&ferry(&["info", "--model", fixture("deepseek_v2").to_str().unwrap(), "--json"]));
    assert_eq!(out["kv_bytes_per_token_f32"], 480);
    assert_eq!(out["kv_bytes_per_token_f32_expanded"], 2304);
    assert_eq!(out["expert_format"], "BF16");
    // auto runs a BF16 checkpoint at its width: experts and projections in bf16.
    assert_eq!((out["expert_dtype"].as_str(), out["dense_dtype"].as_str()), (Some("bf16"), Some("bf16")));
    assert_eq!(out["expert_bytes_each"].as_u64().unwrap() * 2, out["expert_bytes_each_f32"].as_u64().unwrap());
    assert!(out["gpu_resident_bytes"].as_u64().unwrap() < out["gpu_resident_bytes_f32"].as_u64().unwrap());
    let out = json_of(&ferry(&["info", "--model", fixture("gpt_oss").to_str().unwrap(), "--json"]));
    assert!(out["expert_format"].as_str().unwrap().starts_with("MXFP4"), "{}", out["expert_format"]);
    let generated = json_of(&ferry(&[
        "generate",
        "--model",
        fixture("gpt_oss").to_str().unwrap(),
        "--ids",
        "5,6,7",
        "--max-new-tokens",
        "2",
        "--greedy",
        "--vram-budget",
        "25%",
        "--json",
    ]));
    // A quarter of MXFP4 slots: every miss moves the MXFP4 size of one expert.
    let stats = &generated["stats"];
    let misses =
        stats["prefill_experts"]["misses"].as_u64().unwrap() + stats["decode_experts"]["misses"].as_u64().unwrap();
    let bytes = stats["prefill_experts"]["bytes_uploaded"].as_u64().unwrap()
        + stats["decode_experts"]["bytes_uploaded"].as_u64().unwrap();
    assert!(misses > 0);
    assert_eq!(bytes, misses * (3 * 64 * 32 / 2 + 3 * 64 * 32 / 32 * 4));
    // Vulkan and DX12 report the device memory wgpu's allocator holds (Metal and GL do not).
    let backend = generated["adapter"]["backend"].as_str().unwrap().to_lowercase();
    if backend.contains("vulkan") || backend.contains("dx12") {
        let reserved = generated["gpu_memory"]["reserved_bytes"].as_u64().expect("a memory report");
        let allocated = generated["gpu_memory"]["allocated_bytes"].as_u64().unwrap();
        assert!(allocated > 300_000 && allocated <= reserved, "{}", generated["gpu_memory"]);
    }
}

/// `--expert-dtype auto` and `--dense-dtype auto` (the defaults) keep a BF16 checkpoint's experts
/// and projections at their stored width: the logits equal f32's bit for bit, and each miss moves
/// half of f32's bytes.
#[test]
fn auto_runs_bf16_experts_at_their_stored_width_with_f32_logits() {
    let model = fixture("mixtral");
    let ids = ids_arg(&[3, 14, 15, 92, 65, 35]);
    let logits = |extra: &[&str]| {
        let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", &ids, "--all-positions"];
        args.extend_from_slice(extra);
        json_of(&ferry(&args))["logits"].clone()
    };
    let f32_logits = logits(&["--expert-dtype", "f32", "--dense-dtype", "f32"]);
    assert_eq!(logits(&[]), f32_logits, "auto (bf16) against f32 experts and projections");
    assert_eq!(logits(&["--dense-dtype", "bf16"]), f32_logits, "bf16 projections");
    let stats_of = |dtype: &str| {
        let out = json_of(&ferry(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "5,6,7",
            "--max-new-tokens",
            "2",
            "--greedy",
            "--vram-budget",
            "25%",
            "--expert-dtype",
            dtype,
            "--json",
        ]));
        let s = &out["stats"];
        let total = |k: &str| s["prefill_experts"][k].as_u64().unwrap() + s["decode_experts"][k].as_u64().unwrap();
        (total("misses"), total("bytes_uploaded"))
    };
    let ((misses, bytes), (misses_f32, bytes_f32)) = (stats_of("auto"), stats_of("f32"));
    assert!(misses > 0 && misses == misses_f32);
    assert_eq!(bytes * 2, bytes_f32, "a bf16 miss moves half of f32's bytes");
}

#[test]
fn devices_lists_at_least_one_adapter() {
    let out = json_of(&ferry(&["devices", "--json"]));
    assert!(!out.as_array().unwrap().is_empty());
}

#[test]
fn a_missing_model_folder_is_one_error_line() {
    let line = error_line(&ferry(&["logits", "--model", "/nonexistent/model", "--ids", "1"]));
    assert!(line.contains("/nonexistent/model"), "{line}");
}

/// The CPU training backend is a build feature; without it `--device ndarray` says how to get it.
#[cfg(not(feature = "cpu-train"))]
#[test]
fn training_on_the_cpu_without_its_build_feature_names_the_feature() {
    let line = error_line(&ferry(&[
        "train",
        "--arch",
        "moe",
        "--corpus",
        "/nonexistent.txt",
        "--out",
        "/tmp/x",
        "--device",
        "ndarray",
    ]));
    assert!(line.contains("--device ndarray") && line.contains("cpu-train"), "{line}");
}

#[test]
fn a_bad_adapter_flag_is_named() {
    let model = fixture("olmoe");
    let line =
        error_line(&ferry(&["logits", "--model", model.to_str().unwrap(), "--ids", "1", "--adapter", "quantum"]));
    assert!(line.contains("--adapter"), "{line}");
}

#[test]
fn an_adapter_that_does_not_exist_is_a_clear_error() {
    let model = fixture("olmoe");
    let line =
        error_line(&ferry(&["logits", "--model", model.to_str().unwrap(), "--ids", "1", "--adapter", "discrete:7"]));
    assert!(line.contains("no usable GPU adapter"), "{line}");
}

#[test]
fn token_ids_outside_the_vocabulary_are_one_error_line() {
    let model = fixture("olmoe");
    let line = error_line(&ferry(&["logits", "--model", model.to_str().unwrap(), "--ids", "1,99999"]));
    assert!(line.contains("99999") && line.contains("vocabulary"), "{line}");
}

#[test]
fn bad_sampling_flags_are_named() {
    let model = fixture("olmoe");
    let line = error_line(&ferry(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1",
        "--temperature",
        "0.5",
        "--top-p",
        "0",
    ]));
    assert!(line.contains("--top-p"), "{line}");
}

#[test]
fn chat_answers_each_line_with_the_template_and_exits() {
    use std::io::Write;
    let model = fixture("olmoe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["chat", "--model", model.to_str().unwrap(), "--max-new-tokens", "4", "--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ferry chat starts");
    child.stdin.take().unwrap().write_all(b"Hello there\n/reset\nAgain\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A prompt before each of the four lines; replies (random-model text) went to stdout.
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("> ").count(), 4);
    assert!(!out.stdout.is_empty());
}

/// `ferry train` writes a folder Ferry loads, resumes from it, and `ferry convert mole-to-lut`
/// turns a trained MoLE into a table folder whose greedy tokens equal the FFN path's.
#[test]
fn train_resumes_and_a_trained_mole_converts_to_an_equivalent_table() {
    let tmp = std::env::temp_dir().join(format!("ferry-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let corpus = tmp.join("corpus.txt");
    let verse = "In the beginning God created the heaven and the earth. And the earth was without form.\n";
    std::fs::write(&corpus, verse.repeat(300)).unwrap();
    let (model, lut) = (tmp.join("mole"), tmp.join("lut"));
    let train = |steps: &str| {
        let args = [
            "train",
            "--arch",
            "mole",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
            "--steps",
            steps,
            "--eval-every",
            "2",
            "--d-model",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--experts",
            "2",
            "--ffn",
            "32",
            "--vocab",
            "300",
            "--seq-len",
            "16",
            "--batch",
            "2",
        ];
        let out = ferry(&args);
        assert!(out.status.success(), "ferry train: {}", String::from_utf8_lossy(&out.stderr));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("trainer_state.json")).unwrap()).unwrap();
        state["step"].as_u64().unwrap()
    };
    assert_eq!(train("2"), 2);
    assert_eq!(train("4"), 4, "a second run resumes and continues to --steps");
    let out = ferry(&["convert", "mole-to-lut", "--model", model.to_str().unwrap(), "--out", lut.to_str().unwrap()]);
    assert!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    let ids = |dir: &PathBuf| {
        let out = ferry(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            "1,2,3",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        json_of(&out)["ids"].clone()
    };
    assert_eq!(ids(&lut), ids(&model));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `ferry train --arch pregated-moe` resumes like the others and writes a Mixtral folder whose
/// pre-gates Ferry loads as trained (block N's pre-gate is block N+1's gate in the file), and
/// `--pregate-routing` runs it as trained: every prefetch hits, by construction.
#[test]
fn a_pregated_moe_trains_resumes_and_runs_with_pregate_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let verse = "In the beginning God created the heaven and the earth. And the earth was without form.\n";
    std::fs::write(&corpus, verse.repeat(300)).unwrap();
    let model = tmp.path().join("pregated");
    let train = |steps: &str| {
        let args = [
            "train",
            "--arch",
            "pregated-moe",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
            "--steps",
            steps,
            "--eval-every",
            "2",
            "--d-model",
            "32",
            "--layers",
            "3",
            "--heads",
            "2",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--ffn",
            "32",
            "--vocab",
            "300",
            "--seq-len",
            "16",
            "--batch",
            "2",
        ];
        let out = ferry(&args);
        assert!(out.status.success(), "ferry train: {}", String::from_utf8_lossy(&out.stderr));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("trainer_state.json")).unwrap()).unwrap();
        state["step"].as_u64().unwrap()
    };
    assert_eq!(train("2"), 2);
    assert_eq!(train("4"), 4, "a second run resumes and continues to --steps");
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let weights = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = weights.names();
    assert!(names.contains(&"model.layers.0.mlp.pre_gate.weight"));
    assert!(names.contains(&"model.layers.1.mlp.pre_gate.weight"));
    assert!(!names.contains(&"model.layers.2.mlp.pre_gate.weight"), "the last block has no pre-gate");
    let tensor = |n: &str| weights.tensor(n).unwrap().data().to_vec();
    assert_eq!(tensor("model.layers.1.block_sparse_moe.gate.weight"), tensor("model.layers.0.mlp.pre_gate.weight"));
    let generate = |extra: &[&str]| {
        let base = ["generate", "--model", model.to_str().unwrap(), "--ids", "1,2,3", "--max-new-tokens", "6"];
        json_of(&ferry(&[&base[..], &["--ignore-eos", "--json", "--vram-budget", "50%"], extra].concat()))
    };
    let routed = generate(&["--pregate-routing", "--prefetch", "pregate"]);
    let decode = &routed["stats"]["decode_experts"];
    assert!(decode["prefetched"].as_u64().unwrap() > 0, "{decode}");
    assert_eq!(generate(&["--pregate-routing"])["ids"], routed["ids"], "prefetching never changes the tokens");
}

/// `ferry convert quantize` writes a folder that `info` reports as pre-quantised and that
/// generates with the stored format by default; a bad dtype names the flag.
#[test]
fn convert_quantize_writes_a_folder_that_loads_its_stored_format() {
    let tmp = std::env::temp_dir().join(format!("ferry-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let model = fixture("mixtral");
    let out = ferry(&[
        "convert",
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        tmp.to_str().unwrap(),
        "--dtype",
        "int4",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = json_of(&ferry(&["info", "--model", tmp.to_str().unwrap(), "--json"]));
    assert!(info["expert_format"].as_str().unwrap().starts_with("int4"), "{}", info["expert_format"]);
    let generated = json_of(&ferry(&[
        "generate",
        "--model",
        tmp.to_str().unwrap(),
        "--ids",
        "5,6,7",
        "--max-new-tokens",
        "2",
        "--greedy",
        "--json",
    ]));
    assert_eq!(generated["ids"].as_array().unwrap().len(), 2);
    let bad = error_line(&ferry(&[
        "convert",
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        tmp.join("x").to_str().unwrap(),
        "--dtype",
        "int5",
    ]));
    assert!(bad.contains("--dtype") && bad.contains("int5"), "{bad}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Negative numbers reach the flag's own check, which names the flag and its range (clap alone
/// says "unexpected argument '-1'").
#[test]
fn negative_numbers_name_the_flag_and_its_range() {
    let model = fixture("olmoe");
    let model = model.to_str().unwrap();
    let cases: [(&str, &[&str], &str); 10] = [
        ("--ids", &["generate", "--model", model, "--ids", "-1,2"], "0 to 4294967295"),
        ("--ids", &["logits", "--model", model, "--ids", "-3"], "0 to 4294967295"),
        ("--max-new-tokens", &["generate", "--model", model, "--ids", "1", "--max-new-tokens", "-1"], "0 to"),
        ("--seed", &["generate", "--model", model, "--ids", "1", "--seed", "-7"], "0 to 18446744073709551615"),
        ("--top-k", &["generate", "--model", model, "--ids", "1", "--top-k", "-2"], "0 to"),
        ("--temperature", &["generate", "--model", model, "--ids", "1", "--temperature", "-0.5"], ">= 0"),
        ("--top-p", &["generate", "--model", model, "--ids", "1", "--temperature", "1", "--top-p", "-0.5"], "(0, 1]"),
        ("--link-gbps", &["generate", "--model", model, "--ids", "1", "--link-gbps", "-16"], "[1e-6, 1e6]"),
        ("--link-gbps", &["bench", "--model", model, "--link-gbps", "none,-16"], "[1e-6, 1e6]"),
        (
            "--big-fraction",
            &["generate", "--model", model, "--ids", "1", "--experts", "big-little", "--big-fraction", "-0.5"],
            "[0, 1]",
        ),
    ];
    for (flag, args, range) in cases {
        let line = error_line(&ferry(args));
        assert!(line.contains(flag) && line.contains(range), "{args:?}: {line}");
    }
}

/// `--miss-policy` end to end: every routed expert computed on the host under a budget of no
/// slots gives the same greedy tokens and reports its host work; without a host policy that
/// budget, a bad policy and zero threads are refused naming the flag.
#[test]
fn miss_policy_cpu_runs_without_expert_slots_and_bad_values_name_the_flag() {
    let model = fixture("olmoe");
    let model = model.to_str().unwrap();
    let base = ["generate", "--model", model, "--ids", "5,6,7", "--max-new-tokens", "4", "--json"];
    let resident = json_of(&ferry(&base));
    let host =
        json_of(&ferry(&[&base[..], &["--vram-budget", "0%", "--miss-policy", "cpu", "--cpu-threads", "1"]].concat()));
    assert_eq!(host["ids"], resident["ids"]);
    let experts = &host["stats"]["decode_experts"];
    assert!(experts["host_computed"].as_u64().unwrap() > 0, "{experts}");
    assert_eq!(experts["bytes_uploaded"], 0, "{experts}");
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--vram-budget", "0%"], &["--vram-budget", "--miss-policy cpu"]),
        (&["--miss-policy", "gpu"], &["--miss-policy", "'gpu'"]),
        (&["--miss-policy", "cpu", "--cpu-threads", "0"], &["--cpu-threads", "from 1 to 1024"]),
        (&["--miss-policy", "cpu", "--cpu-threads", "100000"], &["--cpu-threads", "from 1 to 1024"]),
    ];
    for (extra, words) in cases {
        let line = error_line(&ferry(&[&base[..], extra].concat()));
        assert!(words.iter().all(|w| line.contains(w)), "{extra:?}: {line}");
    }
}

/// `--route-on` end to end: device and host routing generate the same greedy tokens, a bad value
/// is refused naming the flag and the value, and bench compares the two in one run.
#[test]
fn routing_on_the_device_or_the_host_gives_the_same_tokens_and_bad_values_name_the_flag() {
    let model = fixture("deepseek_v3");
    let base = ["generate", "--model", model.to_str().unwrap(), "--ids", "5,6,7", "--max-new-tokens", "4", "--json"];
    let device = json_of(&ferry(&[&base[..], &["--route-on", "device"]].concat()));
    let host = json_of(&ferry(&[&base[..], &["--route-on", "host"]].concat()));
    assert_eq!(device["ids"], host["ids"]);
    let line = error_line(&ferry(&[&base[..], &["--route-on", "sideways"]].concat()));
    assert!(line.contains("--route-on") && line.contains("'sideways'"), "{line}");
    // bench measures every mode under each routing: the resident decode step reads the host
    // once per MoE layer (two) plus the logits under host routing, twice under device routing.
    let bench = ["bench", "--model", model.to_str().unwrap(), "--route-on", "host,device", "--prompt-len", "4"];
    let out = json_of(&ferry(&[&bench[..], &["--gen-len", "4", "--json"]].concat()));
    assert_eq!(out["greedy_tokens_identical_across_exact_modes"], true);
    let reads: Vec<(&str, &str, f64)> = out["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (m["mode"].as_str().unwrap(), m["routing"].as_str().unwrap(), m["host_reads_per_token"].as_f64().unwrap())
        })
        .collect();
    assert!(reads.contains(&("resident", "host", 3.0)) && reads.contains(&("resident", "device", 2.0)), "{reads:?}");
}

#[test]
fn a_link_so_slow_its_wait_overflows_is_refused_by_the_flag() {
    let model = fixture("olmoe");
    let line =
        error_line(&ferry(&["generate", "--model", model.to_str().unwrap(), "--ids", "1", "--link-gbps", "1e-30"]));
    assert!(line.contains("--link-gbps") && line.contains("[1e-6, 1e6]"), "{line}");
}

/// `--max-new-tokens` of u64::MAX generates until the context is full.
#[test]
fn the_largest_max_new_tokens_is_not_an_overflow() {
    let out = json_of(&ferry(&[
        "generate",
        "--model",
        fixture("olmoe").to_str().unwrap(),
        "--ids",
        "5,6,7",
        "--ignore-eos",
        "--max-new-tokens",
        "18446744073709551615",
        "--json",
    ]));
    assert_eq!(out["stats"]["stop_reason"], "context");
}

#[test]
fn chat_with_ids_is_refused() {
    let model = fixture("olmoe");
    let line = error_line(&ferry(&["generate", "--model", model.to_str().unwrap(), "--ids", "1", "--chat"]));
    assert!(line.contains("--chat") || line.contains("--prompt"), "{line}");
}

#[test]
fn a_model_path_that_is_a_file_is_one_error_line() {
    let line = error_line(&ferry(&["logits", "--model", "/dev/null", "--ids", "1"]));
    assert!(line.contains("/dev/null") && line.contains("not a folder"), "{line}");
}

/// A tokenizer far smaller than the model's vocabulary (another model's?) is reported.
#[test]
fn a_tokenizer_far_smaller_than_the_vocabulary_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("olmoe")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let tiny = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(tmp.path().join("tokenizer.json"), tiny.to_string()).unwrap();
    let out = ferry(&["logits", "--model", tmp.path().to_str().unwrap(), "--ids", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("3 tokens") && stderr.contains("vocab_size is 384"),
        "{stderr}"
    );
}

/// A prompt far longer than the model's context is refused from its size, before the tokenizer
/// spends memory on it: one error line naming the bytes, the tokens they must be and the context.
#[test]
fn a_prompt_far_beyond_the_context_is_refused_before_tokenizing() {
    let model = fixture("mixtral");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let context = config["max_position_embeddings"].as_u64().unwrap() as usize;
    // Far more bytes than any context of tokens could hold, whatever the tokens' lengths.
    let prompt = "word ".repeat(context * 100);
    let line = error_line(&ferry(&["generate", "--model", model.to_str().unwrap(), "--prompt", &prompt]));
    assert!(line.contains("--prompt") && line.contains(&format!("context of {context} tokens")), "{line}");
}

/// Without a desktop session (`XDG_RUNTIME_DIR` unset: ssh, CI, containers) a command prints
/// nothing but its own output: Mesa's device-select Vulkan layer, which complained about the
/// missing session on every Vulkan instance, is switched off there.
#[test]
fn commands_outside_a_desktop_session_print_no_session_warnings() {
    let model = fixture("mixtral");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["logits", "--model", model.to_str().unwrap(), "--ids", "1,2"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .expect("ferry runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// A hub name (`ORG/NAME[@REVISION]`) resolves from the local HuggingFace cache laid out as
/// `huggingface_hub` writes it (refs naming a commit, a snapshot folder of files): the same
/// logits as the folder itself; a name that is not cached, offline, is one error line saying
/// where Ferry looked (downloads: tests/hub.rs).
#[test]
fn hub_names_resolve_from_the_local_huggingface_cache() {
    let cache = tempfile::tempdir().unwrap();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.path().join("models--ferry-test--tiny-mixtral");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(fixture("mixtral")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    let logits = |model: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["logits", "--model", model, "--ids", "1,2,3"])
            .env("HF_HUB_CACHE", cache.path())
            .output()
            .expect("ferry runs");
        json_of(&out)["logits"].clone()
    };
    let folder = fixture("mixtral");
    assert_eq!(logits("ferry-test/tiny-mixtral"), logits(folder.to_str().unwrap()));
    assert_eq!(logits(&format!("ferry-test/tiny-mixtral@{commit}")), logits(folder.to_str().unwrap()));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["logits", "--model", "ferry-test/absent", "--ids", "1"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("ferry runs");
    let line = error_line(&out);
    assert!(line.contains("ferry-test/absent") && line.contains("not in the HuggingFace cache"), "{line}");
    assert!(line.contains("HF_HUB_OFFLINE"), "{line}");
}
