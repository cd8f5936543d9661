//! `ferry chat`: a terminal conversation using the model's chat template and history.

use std::io::{BufRead, Write};

use anyhow::Result;
use ferry_runtime::chat::Message;
use ferry_runtime::engine::{Event, GenerateRequest, generate};

use crate::args::ChatArgs;
use crate::load;

pub fn run(args: ChatArgs) -> Result<()> {
    let mut loaded = load::engine(&args.model, true)?;
    let engine = &mut loaded.engine;
    let Some(tokenizer) = engine.tokenizer.as_ref() else {
        anyhow::bail!("chat needs tokenizer.json in the model folder");
    };
    if !tokenizer.has_chat_template() {
        anyhow::bail!("the model folder's tokenizer_config.json has no chat_template");
    }
    let sampling = super::sampling_config(&args.sampling)?;
    let mut history: Vec<Message> = args.system.iter().map(|s| Message::new("system", s)).collect();
    eprintln!("ferry chat on {} - /reset clears the history, /exit or Ctrl-D quits", loaded.gpu.describe());
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let request = GenerateRequest {
            prompt_ids: tokenizer.encode_chat_within(&history, engine.model.spec().max_position_embeddings)?,
            max_new_tokens: args.sampling.max_new_tokens,
            sampling: sampling.clone(),
            stop_strings: args.sampling.stop.clone(),
            stop_at_eos: !args.sampling.ignore_eos,
        };
        let output = match generate(&mut engine.model, Some(tokenizer), &request, |event| {
            if let Event::Token { text, .. } = event {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
            }
        }) {
            Ok(output) => output,
            Err(err) => {
                // A conversation that outgrew the context is reported; the session goes on.
                eprintln!("\nerror: {err}");
                history.pop();
                continue;
            }
        };
        writeln!(stdout)?;
        history.push(Message::new("assistant", output.text.trim()));
    }
    Ok(())
}
