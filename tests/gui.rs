//! The desktop app as a person runs it, in a real window under Xvfb on whatever adapter wgpu
//! finds (lavapipe in CI): a scripted prompt, then checks from the app's own state that tokens
//! streamed in and the residency map changed, and that a screenshot was written for humans.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{copy_fixture, edit_tensors, fixture};

#[test]
fn the_desktop_app_streams_a_reply_and_its_residency_map_changes_under_xvfb() {
    let xvfb = Command::new("xvfb-run").arg("--help").output();
    assert!(xvfb.is_ok(), "xvfb-run is not installed: run scripts/setup.sh (Debian package xvfb)");
    // Cargo gives integration tests a scratch folder under target/; the screenshot stays there.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gui");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("ferry-gui.png");
    let state = dir.join("state.json");
    let _ = std::fs::remove_file(&shot);
    let _ = std::fs::remove_file(&state);
    let output = Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1280x800x24"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(["gui", "--model"])
        .arg(fixture("mixtral"))
        .args(["--vram-budget", "50%", "--max-new-tokens", "6", "--script-prompt", "Hello there"])
        .arg("--screenshot")
        .arg(&shot)
        .arg("--state-out")
        .arg(&state)
        .args(["--script-timeout", "300"])
        .output()
        .expect("xvfb-run starts ferry gui");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ferry gui failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("--state-out written")).unwrap();
    assert_eq!(report["error"], serde_json::Value::Null, "{report}");
    assert_eq!(report["model_loaded"], true, "{report}");
    assert!(report["tokens_received"].as_u64().unwrap() >= 1, "no tokens arrived: {report}");
    assert!(report["steps"].as_u64().unwrap() >= 2, "a prefill and at least one decode step: {report}");
    assert!(report["residency_changes"].as_u64().unwrap() >= 1, "the residency map never changed: {report}");
    assert!(report["resident_experts"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["backend"].as_str().is_some_and(|b| !b.is_empty()), "{report}");
    let png = std::fs::read(&shot).expect("--screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "not a real screenshot: {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
}

/// A model that fails in the middle of a reply (an expert holding an Inf, found when a miss
/// first uploads it): the app shows the error naming the expert, keeps the conversation, and a
/// scripted run ends with that error instead of hanging or crashing.
#[test]
fn a_reply_that_fails_mid_generation_shows_the_error_and_keeps_the_conversation() {
    let (_tmp, model) = copy_fixture("qwen3_moe");
    edit_tensors(
        &model,
        |n| n.starts_with("model.layers.2.mlp.experts.") && n.ends_with("up_proj.weight"),
        |values| values[5] = f32::INFINITY,
    );
    let state = model.join("state.json");
    let output = Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1280x800x24"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(["gui", "--model"])
        .arg(&model)
        .args(["--vram-budget", "25%", "--max-new-tokens", "4", "--script-prompt", "Hello there"])
        .arg("--state-out")
        .arg(&state)
        .args(["--script-timeout", "300"])
        .output()
        .expect("xvfb-run starts ferry gui");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a failed reply fails the scripted run: {stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("--state-out written")).unwrap();
    assert_eq!(report["model_loaded"], true, "the model loads (its experts are offloaded): {report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("routed expert") && error.contains("inf"), "{report}");
    assert!(!error.contains('\n'), "one line: {error:?}");
    assert!(report["conversation_turns"].as_u64().unwrap() >= 1, "the prompt stays in the chat: {report}");
}
