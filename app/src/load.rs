//! From command-line model arguments to a ready engine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_runtime::chat::ChatTokenizer;
use ferry_runtime::engine::Engine;
use ferry_runtime::graph::Model;
use ferry_runtime::{AdapterChoice, Gpu};

use crate::args::ModelArgs;

/// The model folder the user named, or the built-in default (generated on first use).
pub fn model_folder(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(folder) => Ok(folder.clone()),
        None => Ok(ferry_models::default_model::ensure()?),
    }
}

pub struct Loaded {
    pub engine: Engine,
    pub gpu: Gpu,
}

/// Opens the folder, the GPU and the tokenizer (if the folder has one) and uploads the weights.
pub fn engine(args: &ModelArgs, need_tokenizer: bool) -> Result<Loaded> {
    let folder = model_folder(args)?;
    let opened = ferry_models::open(&folder)?;
    let choice: AdapterChoice = args.adapter.parse()?;
    let gpu = Gpu::open(choice)?;
    let tokenizer = if need_tokenizer || folder.join("tokenizer.json").exists() {
        Some(ChatTokenizer::open(&folder)?)
    } else {
        None
    };
    let model = Model::load(opened.spec, &opened.weights, &gpu.device)
        .with_context(|| format!("loading {}", folder.display()))?;
    Ok(Loaded { engine: Engine::new(model, tokenizer), gpu })
}
