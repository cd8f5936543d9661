//! Errors of the runtime. Each names the file, tensor or flag at fault so a user can act on it.

use std::path::PathBuf;

impl From<ferry_shaders::ShaderError> for FerryError {
    fn from(e: ferry_shaders::ShaderError) -> Self {
        Self::Gpu(e.to_string())
    }
}

impl From<crate::options::OptionError> for FerryError {
    fn from(e: crate::options::OptionError) -> Self {
        Self::Flag { flag: e.flag, message: e.message }
    }
}

/// Everything that can go wrong between a model folder and generated tokens.
#[derive(Debug, thiserror::Error)]
pub enum FerryError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: unknown architecture {found:?}; Ferry supports {supported}")]
    UnknownArchitecture { path: PathBuf, found: String, supported: String },

    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("tensor {name:?} not found in {folder} (looked in {files})")]
    MissingTensor { name: String, folder: PathBuf, files: String },

    #[error("tensor {name:?} in {path}: shape {found:?} does not match the config's {expected:?}")]
    Shape { name: String, path: PathBuf, found: Vec<usize>, expected: Vec<usize> },

    #[error("tensor {name:?} in {path}: dtype {found} is not supported (use F32, F16 or BF16)")]
    Dtype { name: String, path: PathBuf, found: String },

    #[error("{path}: lookup table: {message}")]
    LookupTable { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("token id {id} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error(
        "prompt of {prompt} tokens plus {new} new tokens exceeds the context of {context} tokens (--max-new-tokens or the model's max_position_embeddings)"
    )]
    ContextExceeded { prompt: usize, new: usize, context: usize },

    #[error(
        "prompt of {prompt} tokens exceeds the {limit} tokens of KV cache reserved in GPU memory ({per_token} bytes per token); raise --max-context (and --vram-budget, which counts it) or use a shorter prompt"
    )]
    ContextBeyondReserve { prompt: usize, limit: usize, per_token: u64 },

    #[error(
        "no usable GPU adapter: {0}. On Debian without a GPU, install Mesa's software Vulkan driver: apt-get install mesa-vulkan-drivers"
    )]
    NoAdapter(String),

    #[error("GPU: {0}")]
    Gpu(String),

    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },

    #[error("empty input: {0}")]
    Empty(String),

    /// NaN or Inf where numbers must be finite (logits before sampling).
    #[error("non-finite values: {0}")]
    NonFinite(String),
}

pub type Result<T> = std::result::Result<T, FerryError>;

impl FerryError {
    pub fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        FerryError::Io { path: path.into(), message: err.to_string() }
    }

    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        FerryError::Config { path: path.into(), message: message.into() }
    }

    pub fn flag(flag: impl Into<String>, message: impl Into<String>) -> Self {
        FerryError::Flag { flag: flag.into(), message: message.into() }
    }

    /// A failed GPU read-back of `what` (a lost device, a buffer too large to run), on one line:
    /// burn's execution errors span several.
    pub fn gpu_read(what: &str, err: impl std::fmt::Display) -> Self {
        let reason = err.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        FerryError::Gpu(format!("reading {what}: {reason}"))
    }
}

/// Checks that `path` is a regular file (following links) before it is opened: opening a FIFO
/// blocks until a writer appears, and a folder or device fails later with an unhelpful message.
pub fn regular_file(path: &std::path::Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| FerryError::io(path, e))?;
    if meta.is_file() {
        return Ok(());
    }
    let kind = if meta.is_dir() { "a folder" } else { "not a regular file (a pipe, socket or device?)" };
    Err(FerryError::io(path, format!("{kind}; expected a file")))
}

#[cfg(test)]
mod tests {
    use super::FerryError;

    #[test]
    fn a_multi_line_gpu_error_becomes_one_line_naming_the_read_back() {
        let err = FerryError::gpu_read("logits", "An error happened during execution\nCaused by:\n  binding too large");
        assert_eq!(
            err.to_string(),
            "GPU: reading logits: An error happened during execution Caused by: binding too large"
        );
    }
}
