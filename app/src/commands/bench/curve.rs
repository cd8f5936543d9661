//! `ferry bench --prefill-curve`: prefill time and memory against prompt length, on one loaded
//! model, every length in the same run. On a software adapter (lavapipe) GPU buffers live in this
//! process, so its peak resident set is the peak of GPU memory too.

use anyhow::{Result, bail};
use ferry_runtime::engine::{Engine, GenerateRequest};
use ferry_runtime::graph::attention_scratch_bytes;
use ferry_runtime::measure::memory::{peak_rss_bytes, reset_peak_rss};
use ferry_runtime::sampling::SamplingConfig;
use ferry_runtime::spec::ModelSpec;
use serde::Serialize;

/// One prompt length's prefill.
#[derive(Debug, Serialize)]
pub struct CurvePoint {
    pub prompt_len: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    /// The KV cache the prompt fills (f32, all layers; windowed layers hold their window).
    pub kv_bytes: u64,
    /// Attention's scratch beyond its output (`attention_scratch_bytes`): one block of keys'
    /// scores for at most `--prefill-chunk` queries, a bound that does not grow with the prompt.
    pub attention_scratch_bytes: u64,
    /// Peak resident set of this process during the prefill (Linux; None elsewhere).
    pub peak_rss_bytes: Option<u64>,
}

/// Prefills a prompt of each of `lengths` (random ids, no EOS) and generates one token.
pub fn measure(
    engine: &mut Engine,
    spec: &ModelSpec,
    lengths: &[usize],
    chunk: usize,
    seed: u64,
) -> Result<Vec<CurvePoint>> {
    let context = engine.model.context_limit();
    if let Some(&too_long) = lengths.iter().find(|&&n| n >= context) {
        bail!(
            "--prefill-curve: {too_long} tokens do not fit this model's context of {context} (one more token is generated)"
        );
    }
    // Kernels compile (and matmuls autotune) per shape on first use: a prompt of two full passes
    // and a short one first, so that the first length measured does not pay for them.
    let warm = (2 * chunk + 3).min(lengths.iter().copied().min().unwrap_or(1)).max(1);
    engine.generate(&request_for(spec, warm, seed), |_| {})?;
    let mut points = Vec::with_capacity(lengths.len());
    for &n in lengths {
        reset_peak_rss();
        let out = engine.generate(&request_for(spec, n, seed), |_| {})?;
        points.push(CurvePoint {
            prompt_len: n,
            prefill_seconds: out.stats.prefill_seconds,
            prefill_tokens_per_second: out.stats.prefill_tokens_per_second,
            kv_bytes: spec.attention.kv_elements(spec.num_layers(), n) as u64 * 4,
            attention_scratch_bytes: attention_scratch_bytes(spec.attention.num_heads, chunk.min(n)),
            peak_rss_bytes: peak_rss_bytes(),
        });
    }
    Ok(points)
}

/// A prompt of `n` random tokens and one token to generate.
fn request_for(spec: &ModelSpec, n: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: super::random_prompt(spec, n, seed),
        max_new_tokens: 1,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    }
}

pub fn print(points: &[CurvePoint]) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "prompt", "prefill s", "tok/s", "KV MiB", "attn scratch", "peak RSS"
    );
    for p in points {
        println!(
            "{:>8} {:>10.2} {:>10.1} {:>10.1} {:>9.2} MiB {:>10}",
            p.prompt_len,
            p.prefill_seconds,
            p.prefill_tokens_per_second,
            mib(p.kv_bytes),
            mib(p.attention_scratch_bytes),
            p.peak_rss_bytes.map_or("n/a".to_string(), |b| format!("{:.0} MiB", mib(b))),
        );
    }
}
