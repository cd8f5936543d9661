//! Text in and out: `tokenizer.json` through the `tokenizers` crate, and the chat template from
//! `tokenizer_config.json` rendered with minijinja the way transformers renders it.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};

use crate::error::{FerryError, Result, regular_file};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Template instructions one rendering may run: real chat templates take a few hundred per
/// message.
const TEMPLATE_FUEL: u64 = 50_000_000;
/// What a rendering may add to the messages' own text, in bytes.
const MAX_RENDERED_BYTES: usize = 16 << 20;

fn content_bytes(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.role.len() + m.content.len()).sum()
}

/// Rendered text that refuses to grow past `limit` bytes.
struct BoundedText {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("rendered text too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A model folder's tokenizer and chat template.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// Bytes of the vocabulary's longest token string: a text of `n` bytes is at least
    /// `n / longest_token` tokens, which tells a prompt too long for the context before the
    /// tokenizer spends memory on it.
    longest_token: usize,
    path: PathBuf,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// `bos_token` and friends are either a string or an AddedToken object with `content`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Reads `tokenizer.json` and, if present, `tokenizer_config.json` from a model folder.
    pub fn open(folder: &Path) -> Result<Self> {
        let path = folder.join("tokenizer.json");
        if !path.exists() {
            return Err(FerryError::Tokenizer { path, message: "missing".into() });
        }
        // Every file the folder names is checked to be a regular one first: a FIFO would block.
        regular_file(&path)?;
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| FerryError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let config_path = folder.join("tokenizer_config.json");
        let (mut template, mut bos_token, mut eos_token) = (None, None, None);
        if config_path.exists() {
            regular_file(&config_path)?;
            let text = std::fs::read_to_string(&config_path).map_err(|e| FerryError::io(&config_path, e))?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| FerryError::Json { path: config_path.clone(), message: e.to_string() })?;
            template = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: use the one named "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            bos_token = token_string(config.get("bos_token"));
            eos_token = token_string(config.get("eos_token"));
        }
        // Newer folders keep the template in its own file.
        let jinja_path = folder.join("chat_template.jinja");
        if template.is_none() && jinja_path.exists() {
            regular_file(&jinja_path)?;
            template = Some(std::fs::read_to_string(&jinja_path).map_err(|e| FerryError::io(&jinja_path, e))?);
        }
        let longest_token = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self { tokenizer, longest_token, path, template, bos_token, eos_token })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| FerryError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `encode`, refusing before any work a text that cannot fit `context` tokens (at least
    /// one token per `longest_token` bytes): a document far beyond the context is an error naming
    /// its size, not a tokenizer that runs out of memory.
    pub fn encode_within(&self, text: &str, add_special_tokens: bool, context: usize) -> Result<Vec<u32>> {
        let at_least = self.fewest_tokens(text);
        if at_least > context {
            return Err(FerryError::flag(
                "--prompt",
                format!(
                    "{} bytes are at least {at_least} tokens (no token is longer than {} bytes), more than the model's context of {context} tokens",
                    text.len(),
                    self.longest_token
                ),
            ));
        }
        self.encode(text, add_special_tokens)
    }

    /// The fewest tokens `text` can encode to (no token is longer than the longest in the
    /// vocabulary): tells a text far beyond a context without tokenizing it.
    pub fn fewest_tokens(&self, text: &str) -> usize {
        text.len() / self.longest_token
    }

    /// `encode_chat` with `encode_within`'s bound on the rendered conversation.
    pub fn encode_chat_within(&self, messages: &[Message], context: usize) -> Result<Vec<u32>> {
        let text = self.render(messages, true)?;
        self.encode_within(&text, false, context)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| FerryError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders the conversation with the model's chat template.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            FerryError::Template("the model folder has no chat_template in tokenizer_config.json".into())
        })?;
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        // Templates are code from the model folder: bound their work and their output, so a
        // loop that never ends or a string that fills memory is an error, not a hang or abort.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", template).map_err(|e| FerryError::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| FerryError::Template(e.to_string()))?;
        let mut out =
            BoundedText { bytes: Vec::new(), limit: MAX_RENDERED_BYTES + content_bytes(messages), exceeded: false };
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            },
            &mut out,
        );
        if out.exceeded {
            return Err(FerryError::Template(format!(
                "the rendered conversation passed {} bytes (the messages hold {}); the template's output is bounded",
                out.limit,
                content_bytes(messages)
            )));
        }
        rendered.map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => FerryError::Template(format!(
                "rendering took more than {TEMPLATE_FUEL} steps (a loop that does not end?)"
            )),
            _ => FerryError::Template(e.to_string()),
        })?;
        String::from_utf8(out.bytes).map_err(|e| FerryError::Template(e.to_string()))
    }

    /// Renders and tokenizes a conversation (special tokens come from the template itself).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render(messages, true)?;
        self.encode(&text, false)
    }
}
