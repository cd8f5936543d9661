//! Ferry's model families: one file each, mapping a HuggingFace `config.json` and its tensor
//! names onto the runtime's `ModelSpec`.

mod common;
pub mod config;
pub mod deepseek;
pub mod gpt_oss;
pub mod hub;
pub mod mixtral;
pub mod mole;
pub mod olmoe;
pub mod quantize;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod random_model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_runtime::error::{FerryError, Result};
use ferry_runtime::spec::{ExpertLayout, ModelSpec};
use ferry_runtime::weights::WeightStore;

use crate::config::HfConfig;

type SpecFn = fn(&HfConfig) -> Result<ModelSpec>;

/// Supported `architectures` values and the family that reads them.
pub const FAMILIES: &[(&str, SpecFn)] = &[
    (mixtral::ARCHITECTURE, mixtral::spec),
    (qwen2_moe::ARCHITECTURE, qwen2_moe::spec),
    (qwen3_moe::ARCHITECTURE, qwen3_moe::spec),
    (olmoe::ARCHITECTURE, olmoe::spec),
    (deepseek::ARCHITECTURE_V2, deepseek::spec_v2),
    (deepseek::ARCHITECTURE_V3, deepseek::spec_v3),
    (gpt_oss::ARCHITECTURE, gpt_oss::spec),
    (mole::ARCHITECTURE, mole::spec),
];

/// Reads `config.json` (and `generation_config.json`) into a spec, without touching weights.
pub fn read_spec(folder: &Path) -> Result<ModelSpec> {
    let cfg = HfConfig::read(folder)?;
    let architecture = cfg.architecture()?;
    let (_, spec_fn) =
        FAMILIES.iter().find(|(a, _)| *a == architecture).ok_or_else(|| FerryError::UnknownArchitecture {
            path: cfg.path.clone(),
            found: architecture.clone(),
            supported: FAMILIES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", "),
        })?;
    let mut spec = spec_fn(&cfg)?;
    if let Some(dtype) = quantize::stored_dtype(&cfg)? {
        spec.moe.layout = ExpertLayout::Prequantised(dtype);
    }
    if let Some(eos) = config::generation_eos(folder)? {
        spec.eos_token_ids = eos;
    }
    common::validate(&cfg, &spec)?;
    Ok(spec)
}

/// A model folder opened for loading: its spec and memory-mapped weights.
pub struct ModelFolder {
    pub folder: PathBuf,
    pub spec: ModelSpec,
    pub weights: Arc<WeightStore>,
}

/// Opens a HuggingFace model folder: config, then the safetensors shards (mapped, not read).
pub fn open(folder: &Path) -> Result<ModelFolder> {
    let spec = read_spec(folder)?;
    let weights = Arc::new(WeightStore::open(folder)?);
    Ok(ModelFolder { folder: folder.to_path_buf(), spec, weights })
}
