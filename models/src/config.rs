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
        if !folder.exists() {
            return Err(FerryError::io(folder, "model folder does not exist"));
        }
        if !folder.is_dir() {
            return Err(FerryError::io(folder, "not a folder; --model takes the model folder (with config.json)"));
        }
        ferry_runtime::error::regular_file(&path)?;
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

    /// An integer up to u32::MAX: no model size is larger, and the product of two stays
    /// within usize, so sizes computed from them cannot overflow before they are range-checked.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u64::from(u32::MAX))
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.error(format!("{key:?} must be an integer in 0..={}, found {v}", u32::MAX))),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|f| f as f32)
                .filter(|f| f.is_finite())
                .ok_or_else(|| self.error(format!("{key:?} must be a number within f32's range, found {v}"))),
        }
    }

    /// A number in `min..=max` (`min` itself excluded when `open_min`), `default` when absent.
    pub fn f32_in(&self, key: &str, default: f32, [min, max]: [f32; 2], open_min: bool) -> Result<f32> {
        let value = self.f32_or(key, default)?;
        let above = if open_min { value > min } else { value >= min };
        if above && value <= max {
            return Ok(value);
        }
        let low = if open_min { "(" } else { "[" };
        Err(self.error(format!("{key:?} must be in {low}{min}, {max}], found {value}")))
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
        match self.get("architectures") {
            None => Err(self.error("missing \"architectures\" (which model family this is)")),
            Some(Value::Array(items)) => items.first().and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                self.error("\"architectures\" must list the model class first, e.g. [\"MixtralForCausalLM\"]")
            }),
            Some(other) => {
                Err(self
                    .error(format!("\"architectures\" must be a list such as [\"MixtralForCausalLM\"], found {other}")))
            }
        }
    }

    /// Token ids given as one integer or a list (`eos_token_id`).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        token_ids(self.get(key)).map_err(|e| self.error(format!("{key:?}: {e}")))
    }

    /// RoPE settings from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters`
    /// (transformers 5).
    pub fn rope(&self, default_theta: f32) -> Result<RopeSpec> {
        let params = self.get("rope_parameters").or_else(|| self.get("rope_scaling"));
        if let Some(p) = params
            && !p.is_object()
        {
            return Err(self.error(format!(
                "rope_scaling must be an object such as {{\"rope_type\": \"linear\", \"factor\": 2.0}}, found {p}"
            )));
        }
        let theta = match params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t as f32,
            None => self.f32_or("rope_theta", default_theta)?,
        };
        if !(theta > 0.0 && theta.is_finite() && theta <= 1e12) {
            return Err(self.error(format!("\"rope_theta\" must be in (0, 1e12], found {theta}")));
        }
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
                        if !(factor > 0.0 && factor <= MAX_ROPE_FACTOR) {
                            return Err(self.error(format!(
                                "rope scaling \"linear\": \"factor\" must be in (0, {MAX_ROPE_FACTOR}], found {factor}"
                            )));
                        }
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
        if !(1.0..=MAX_ROPE_FACTOR).contains(&factor) {
            return Err(self.error(format!(
                "rope scaling \"yarn\": \"factor\" must be in [1, {MAX_ROPE_FACTOR}], found {factor}"
            )));
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

/// Largest RoPE scaling factor accepted (released models use up to 40); beyond it positions
/// collapse onto each other.
const MAX_ROPE_FACTOR: f64 = 1e4;

/// Token ids given as one integer or a list; an id beyond u32 would be truncated into another
/// token.
pub fn token_ids(value: Option<&Value>) -> std::result::Result<Vec<u32>, String> {
    let id = |v: &Value| -> std::result::Result<Option<u32>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| format!("token id {n} is not in 0..={}", u32::MAX)),
            other => Err(format!("token ids must be integers, found {other}")),
        }
    };
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().filter_map(|v| id(v).transpose()).collect(),
        Some(v) => Ok(id(v)?.into_iter().collect()),
    }
}

/// EOS ids from `generation_config.json` when present (it overrides config.json there too).
pub fn generation_eos(folder: &Path) -> Result<Option<Vec<u32>>> {
    let path = folder.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    ferry_runtime::error::regular_file(&path)?;
    let text = std::fs::read_to_string(&path).map_err(|e| FerryError::io(&path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| FerryError::Json { path: path.clone(), message: e.to_string() })?;
    let ids = token_ids(value.get("eos_token_id"))
        .map_err(|e| FerryError::config(&path, format!("\"eos_token_id\": {e}")))?;
    Ok(if ids.is_empty() { None } else { Some(ids) })
}
