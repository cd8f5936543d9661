//! `ferry generate`: stream text for a prompt, or print one JSON object with `--json`.

use std::io::Write;

use anyhow::{Context, Result};
use ferry_runtime::chat::Message;
use ferry_runtime::engine::{Event, GenerateRequest};

use crate::args::GenerateArgs;
use crate::load;

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut loaded = load::engine(&args.model, args.prompt.is_some())?;
    let engine = &mut loaded.engine;
    let context = engine.model.spec().max_position_embeddings;
    let prompt_ids = match (&args.prompt, &args.ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tokenizer = engine.tokenizer.as_ref().context("--prompt needs tokenizer.json in the model folder")?;
            if args.chat {
                tokenizer.encode_chat_within(&[Message::new("user", text)], context)?
            } else {
                tokenizer.encode_within(text, true, context)?
            }
        }
        (None, None) => anyhow::bail!("give --prompt TEXT or --ids 1,2,3"),
    };
    let request = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: args.sampling.max_new_tokens,
        sampling: super::sampling_config(&args.sampling)?,
        stop_strings: args.sampling.stop.clone(),
        stop_at_eos: !args.sampling.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let output = engine.generate(&request, |event| {
        if let (false, Event::Token { text, .. }) = (args.json, event) {
            // Streaming to a closed pipe is not worth failing the generation over.
            let _ = write!(stdout, "{text}");
            let _ = stdout.flush();
        }
    })?;
    if let Some(path) = &args.save_expert_profile {
        let profile = load::ExpertProfile { usage: engine.model.experts().usage().to_vec() };
        std::fs::write(path, serde_json::to_string(&profile)?)
            .with_context(|| format!("--save-expert-profile {}", path.display()))?;
    }
    if args.json {
        let value = serde_json::json!({
            "prompt_ids": prompt_ids,
            "ids": output.ids,
            "text": output.text,
            "stats": output.stats,
            "expert_plan": engine.model.experts().plan(),
            "adapter": loaded.gpu.adapter,
            "gpu_memory": loaded.gpu.memory(),
        });
        writeln!(stdout, "{value}")?;
    } else {
        writeln!(stdout)?;
        let s = &output.stats;
        let e = s.prefill_experts + s.decode_experts;
        eprintln!(
            "[{} prompt tokens, {} new; prefill {:.1} tok/s, decode {:.1} tok/s, first token {:.3} s; experts: hit rate {:.1}%, {:.2} MiB uploaded; {}]",
            s.prompt_tokens,
            s.new_tokens,
            s.prefill_tokens_per_second,
            s.decode_tokens_per_second,
            s.time_to_first_token_seconds,
            100.0 * e.hit_rate(),
            e.bytes_uploaded as f64 / (1024.0 * 1024.0),
            loaded.gpu.describe()
        );
        let l = s.prefill_lookup + s.decode_lookup;
        if l.rows_fetched > 0 {
            eprintln!(
                "[lookup table: {} rows ({} from the row cache), {:.2} MiB read, {:.2} MiB uploaded]",
                l.rows_fetched,
                l.row_cache_hits,
                l.bytes_read as f64 / 1048576.0,
                l.bytes_uploaded as f64 / 1048576.0
            );
        }
    }
    Ok(())
}
