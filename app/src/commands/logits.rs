//! `ferry logits`: the stable JSON contract external checks use:
//! `{"logits": [[f32; vocab] per position], "routing": [[[expert ids] per token] per layer]}`.

use anyhow::Result;
use ferry_runtime::graph::LogitsFor;

use crate::args::LogitsArgs;
use crate::load;

/// Serialised directly (not through `serde_json::Value`) so f32 values print in their shortest
/// round-tripping form.
#[derive(serde::Serialize)]
struct LogitsReport {
    logits: Vec<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<Vec<Vec<Vec<u32>>>>,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let mut loaded = load::engine(&args.model, false)?;
    let model = &mut loaded.engine.model;
    let mut cache = model.new_cache(args.ids.len())?;
    let which = if args.all_positions { LogitsFor::All } else { LogitsFor::Last };
    let output = model.forward(&args.ids, &mut cache, which)?;
    // JSON would print NaN and Inf as null: say what happened instead.
    for (position, row) in output.logits.iter().enumerate() {
        if let Some(token) = row.iter().position(|v| !v.is_finite()) {
            anyhow::bail!(
                "the logits at position {position} hold {} (token {token}); a weight or activation overflowed",
                row[token]
            );
        }
    }
    let report = LogitsReport { logits: output.logits, routing: args.routing.then_some(output.routing) };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
