//! Reading HuggingFace `config.json` and `generation_config.json`, with errors naming the key.

use std::path::{Path, PathBuf};

use ferry_runtime::error::{FerryError, Result};
use ferry_runtime::spec::{RopeScaling, RopeSpec, YarnSpec};
use serde_json::Value;

/// A parsed `config.json`.
pub struct HfConfig {
    pub path: PathBuf,
    value: Value,
}

impl HfConfig {
    pub fn read(folder: &Path) -> Result<Self> {
        let path = folder.join("config.json");
        if !folder.is_dir() {
            return Err(FerryError::io(folder, "model folder does not exist"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| FerryError::io(&path, e))?;
        let value =
            serde_json::from_str(&text).map_err(|e| FerryError::Json { path: path.clone(), message: e.to_string() })?;
        Ok(Self { path, value })
    }

    pub fn from_value(path: PathBuf, value: Value) -> Self {
        Self { path, value }
    }

    fn error(&self, message: impl Into<String>) -> FerryError {
        FerryError::config(&self.path, message)
    }

    /// Whether the key is written at all (an explicit `null` counts: DeepSeek's `q_lora_rank`
    /// is null for "no q-LoRA" but defaults to a rank when absent).
    pub fn has_key(&self, key: &str) -> bool {
        self.value.get(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.error(format!("missing {key:?}")))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.error(format!("{key:?} must be a non-negative integer, found {v}"))),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().map(|f| f as f32).ok_or_else(|| self.error(format!("{key:?} must be a number, found {v}")))
            }
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.error(format!("{key:?} must be true or false, found {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.error(format!("{key:?} must be a string, found {v}"))),
        }
    }

    /// A list of integers (`mlp_only_layers`); absent means empty.
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| self.error(format!("{key:?} must list integers")))
                })
                .collect(),
            Some(v) => Err(self.error(format!("{key:?} must be a list, found {v}"))),
        }
    }

    /// The first entry of `architectures`.
    pub fn architecture(&self) -> Result<String> {
        self.get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.error("missing \"architectures\" (which model family this is)"))
    }

    /// Token ids given as one integer or a list (`eos_token_id`).
    pub fn token_ids(&self, key: &str) -> Vec<u32> {
        token_ids(self.get(key))
    }

    /// RoPE settings from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters`
    /// (transformers 5).
    pub fn rope(&self, default_theta: f32) -> Result<RopeSpec> {
        let params = self.get("rope_parameters").or_else(|| self.get("rope_scaling"));
        let theta = match params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t as f32,
            None => self.f32_or("rope_theta", default_theta)?,
        };
        let scaling = match params {
            None => RopeScaling::None,
            Some(p) => {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => {
                        let factor = p
                            .get("factor")
                            .and_then(Value::as_f64)
                            .ok_or_else(|| self.error("rope scaling \"linear\" needs a numeric \"factor\""))?;
                        RopeScaling::Linear { factor: factor as f32 }
                    }
                    "yarn" => RopeScaling::Yarn(self.yarn(p)?),
                    other => {
                        return Err(self.error(format!(
                            "rope scaling type {other:?} is not supported yet (supported: default, linear, yarn)"
                        )));
                    }
                }
            }
        };
        Ok(RopeSpec { theta, scaling })
    }
}

impl HfConfig {
    /// YaRN parameters as transformers reads them (`_compute_yarn_parameters`).
    fn yarn(&self, p: &Value) -> Result<YarnSpec> {
        let number = |key: &str| -> Result<Option<f64>> {
            match p.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.error(format!("rope scaling \"yarn\": {key:?} must be a number, found {v}"))),
            }
        };
        let factor = number("factor")?.ok_or_else(|| self.error("rope scaling \"yarn\" needs a numeric \"factor\""))?;
        if factor < 1.0 {
            return Err(self.error(format!("rope scaling \"yarn\": \"factor\" must be at least 1, found {factor}")));
        }
        let context = self.usize_or("max_position_embeddings", 4096)?;
        let original = match number("original_max_position_embeddings")? {
            Some(n) if n >= 1.0 && n.fract() == 0.0 => n as usize,
            Some(n) => {
                return Err(self.error(format!(
                    "rope scaling \"yarn\": \"original_max_position_embeddings\" must be a positive integer, found {n}"
                )));
            }
            None => context,
        };
        let (mscale, mscale_all_dim) = (number("mscale")?, number("mscale_all_dim")?);
        let attention_factor = match (number("attention_factor")?, mscale, mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                YarnSpec::mscale(factor, m) / YarnSpec::mscale(factor, all)
            }
            _ => YarnSpec::mscale(factor, 1.0),
        };
        // transformers: `get("beta_fast") or 32`, so 0 also means the default.
        let beta =
            |key: &str, default: f64| -> Result<f64> { Ok(number(key)?.filter(|&b| b != 0.0).unwrap_or(default)) };
        let (beta_fast, beta_slow) = (beta("beta_fast", 32.0)?, beta("beta_slow", 1.0)?);
        if beta_fast <= 0.0 || beta_slow <= 0.0 {
            return Err(self.error(format!(
                "rope scaling \"yarn\": beta_fast ({beta_fast}) and beta_slow ({beta_slow}) must be positive"
            )));
        }
        let truncate = match p.get("truncate").filter(|v| !v.is_null()) {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| {
                self.error(format!("rope scaling \"yarn\": \"truncate\" must be true or false, found {v}"))
            })?,
        };
        Ok(YarnSpec {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
            mscale_all_dim,
        })
    }
}

pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

/// EOS ids from `generation_config.json` when present (it overrides config.json there too).
pub fn generation_eos(folder: &Path) -> Result<Option<Vec<u32>>> {
    let path = folder.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| FerryError::io(&path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| FerryError::Json { path: path.clone(), message: e.to_string() })?;
    let ids = token_ids(value.get("eos_token_id"));
    Ok(if ids.is_empty() { None } else { Some(ids) })
}
