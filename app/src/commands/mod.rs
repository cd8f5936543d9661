//! One module per subcommand.

mod bench;
mod chat;
mod convert;
mod devices;
mod eval;
mod generate;
mod info;
mod logits;
mod predictor;
mod random_model;
mod trace;

use anyhow::Result;
use ferry_runtime::sampling::SamplingConfig;

use crate::args::{Cli, Command, SamplingArgs};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Info(args) => info::run(args),
        Command::Devices(args) => devices::run(args),
        Command::Bench(args) => bench::run(args),
        Command::RandomModel(args) => random_model::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Train(args) => crate::train::run(args),
        Command::Trace(args) => trace::run(args),
        Command::CacheSim(args) => trace::cache_sim(args),
        Command::Predictor(command) => predictor::run(command),
        Command::Gui(args) => crate::gui::run(args),
        Command::Serve(args) => crate::serve::run(args),
    }
}

/// Sampling settings from the flags: greedy unless a temperature is given.
pub fn sampling_config(args: &SamplingArgs) -> Result<SamplingConfig> {
    let temperature = if args.greedy { 0.0 } else { args.temperature.unwrap_or(0.0) };
    if !(temperature >= 0.0 && temperature.is_finite()) {
        anyhow::bail!("--temperature must be a finite number >= 0, got {temperature}");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if !(0.0..=1.0).contains(&args.min_p) {
        anyhow::bail!("--min-p must be in [0, 1], got {}", args.min_p);
    }
    if !(args.repetition_penalty > 0.0 && args.repetition_penalty.is_finite()) {
        anyhow::bail!("--repetition-penalty must be a positive number, got {}", args.repetition_penalty);
    }
    Ok(SamplingConfig {
        temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    })
}
