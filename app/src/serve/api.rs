//! The OpenAI-style request bodies, checked and turned into a [`GenerateRequest`]: every field
//! Ferry honours, and a 400 naming the field for one it cannot (several choices, log
//! probabilities, penalties it does not implement).

use ferry_runtime::chat::{ChatTokenizer, Message};
use ferry_runtime::engine::GenerateRequest;
use ferry_runtime::sampling::SamplingConfig;
use serde::Deserialize;

use super::error::ApiError;

/// The fields of `/v1/chat/completions` and `/v1/completions` bodies (each endpoint checks
/// that its own required field is there). Unknown fields are ignored, as OpenAI's server does.
#[derive(Debug, Deserialize)]
pub struct Body {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extensions llama.cpp's and vLLM's servers accept too.
    pub top_k: Option<u64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<serde_json::Number>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<serde_json::Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u64>,
    pub suffix: Option<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// OpenAI accepts up to four stop strings.
const MAX_STOPS: usize = 4;

/// Parses a body, naming the field at fault (`messages[0].role: missing field`).
pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::bad_request(None, format!("the body is not a JSON object: {inner}"))
        } else {
            ApiError::bad_request(Some(&path), format!("{path}: {inner}"))
        }
    })
}

/// Server-wide defaults for what a request leaves out (the command's sampling flags).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub stop_at_eos: bool,
}

/// A checked request, ready for the worker.
#[derive(Debug)]
pub struct Prepared {
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
}

impl Body {
    /// Refuses fields Ferry does not implement with a value that would change the answer.
    fn unsupported(&self) -> Result<(), ApiError> {
        let refuse = |param: &str, why: &str| Err(ApiError::bad_request(Some(param), format!("{param}: {why}")));
        if self.n.is_some_and(|n| n != 1) {
            return refuse("n", "only one choice per request is supported (n = 1)");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return refuse("best_of", "only best_of = 1 is supported");
        }
        // `false`, `0` and null ask for nothing (chat takes a flag, completions a count).
        let wants = |v: &Option<serde_json::Value>| {
            v.as_ref().is_some_and(|v| {
                !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)) && v.as_u64() != Some(0)
            })
        };
        if wants(&self.logprobs) || wants(&self.top_logprobs) {
            return refuse("logprobs", "log probabilities are not supported yet");
        }
        if self.echo == Some(true) {
            return refuse("echo", "echoing the prompt is not supported");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix", "insertion (suffix) is not supported");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return refuse("presence_penalty", "not supported (use repetition_penalty)");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return refuse("frequency_penalty", "not supported (use repetition_penalty)");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse("tools", "tool calling is not supported");
        }
        Ok(())
    }

    /// The sampling settings and length of this request over `defaults`.
    pub fn prepare(&self, prompt_ids: Vec<u32>, defaults: &Defaults) -> Result<Prepared, ApiError> {
        self.unsupported()?;
        let mut sampling = defaults.sampling.clone();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad_request(
                    Some("temperature"),
                    format!("temperature must be between 0 and 2, got {t}"),
                ));
            }
            sampling.temperature = t as f32;
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad_request(Some("top_p"), format!("top_p must be between 0 and 1, got {p}")));
            }
            if p == 0.0 {
                // Nothing but the most likely token reaches a mass of 0: greedy.
                sampling.temperature = 0.0;
            } else {
                sampling.top_p = p as f32;
            }
        }
        if let Some(k) = self.top_k {
            sampling.top_k = usize::try_from(k).unwrap_or(usize::MAX);
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad_request(Some("min_p"), format!("min_p must be between 0 and 1, got {p}")));
            }
            sampling.min_p = p as f32;
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite() && r <= 100.0) {
                return Err(ApiError::bad_request(
                    Some("repetition_penalty"),
                    format!("repetition_penalty must be a positive number up to 100, got {r}"),
                ));
            }
            sampling.repetition_penalty = r as f32;
        }
        if let Some(seed) = &self.seed {
            // Negative seeds are as good as any: their two's-complement bits.
            sampling.seed = match (seed.as_u64(), seed.as_i64()) {
                (Some(s), _) => s,
                (None, Some(s)) => s as u64,
                _ => return Err(ApiError::bad_request(Some("seed"), format!("seed must be an integer, got {seed}"))),
            };
        }
        let stop_strings = match &self.stop {
            None => defaults.stop.clone(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop_strings.len() > MAX_STOPS.max(defaults.stop.len()) {
            return Err(ApiError::bad_request(
                Some("stop"),
                format!("stop takes at most {MAX_STOPS} strings, got {}", stop_strings.len()),
            ));
        }
        // `max_completion_tokens` is the newer name; either bounds the reply.
        let max_new_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => defaults.max_new_tokens,
        };
        let include_usage = self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        Ok(Prepared {
            request: GenerateRequest {
                prompt_ids,
                max_new_tokens,
                sampling,
                stop_strings,
                stop_at_eos: defaults.stop_at_eos && !self.ignore_eos.unwrap_or(false),
            },
            stream: self.stream.unwrap_or(false),
            include_usage,
        })
    }

    /// The conversation of a chat request, as the template takes it.
    pub fn chat_messages(&self) -> Result<Vec<Message>, ApiError> {
        let messages =
            self.messages.as_ref().ok_or_else(|| ApiError::bad_request(Some("messages"), "messages is required"))?;
        if messages.is_empty() {
            return Err(ApiError::bad_request(Some("messages"), "messages must hold at least one message"));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    // OpenAI's newer name for the system prompt; templates know "system".
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant" | "tool") => r,
                    other => {
                        return Err(ApiError::bad_request(
                            Some(&format!("messages[{i}].role")),
                            format!(
                                "messages[{i}].role: unknown role {other:?} (system, developer, user, assistant or tool)"
                            ),
                        ));
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(text)) => text.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::bad_request(
                                        Some(&format!("messages[{i}].content[{j}]")),
                                        format!(
                                            "messages[{i}].content[{j}]: only text parts are supported, got type {kind:?}"
                                        ),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message::new(role, &content))
            })
            .collect()
    }

    /// The token ids of a completion request's prompt (one prompt per request).
    pub fn completion_ids(
        &self,
        tokenizer: &ChatTokenizer,
        vocab: usize,
        context: usize,
    ) -> Result<Vec<u32>, ApiError> {
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::bad_request(Some("prompt"), format!("prompt: one prompt per request, got {n}")))
            }
        };
        let ids = match &self.prompt {
            None => return Err(ApiError::bad_request(Some("prompt"), "prompt is required")),
            Some(Prompt::Text(text)) => encode(tokenizer, text, context)?,
            Some(Prompt::Texts(texts)) => {
                one(texts.len())?;
                encode(tokenizer, &texts[0], context)?
            }
            Some(Prompt::Ids(ids)) => ids.clone(),
            Some(Prompt::IdLists(lists)) => {
                one(lists.len())?;
                lists[0].clone()
            }
        };
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
            return Err(ApiError::bad_request(
                Some("prompt"),
                format!("prompt[{i}]: token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(ids)
    }
}

/// Tokenizes a completion prompt as `ferry generate --prompt` does, refusing a text that
/// cannot fit the context before the tokenizer runs.
fn encode(tokenizer: &ChatTokenizer, text: &str, context: usize) -> Result<Vec<u32>, ApiError> {
    check_length(tokenizer.fewest_tokens(text), false, context)?;
    tokenizer.encode(text, true).map_err(|e| ApiError::bad_request(Some("prompt"), e.to_string()))
}

/// A prompt of `tokens` (`exact`, or at least that many) cannot be answered within `context`:
/// 413.
pub fn check_length(tokens: usize, exact: bool, context: usize) -> Result<(), ApiError> {
    if tokens >= context {
        return Err(ApiError::too_large(format!(
            "the prompt is {}{tokens} tokens, and the model's context of {context} must hold it and at least one new token",
            if exact { "" } else { "at least " }
        )));
    }
    Ok(())
}

/// The chat template applied to `messages`, tokenized.
pub fn chat_ids(tokenizer: &ChatTokenizer, messages: &[Message], context: usize) -> Result<Vec<u32>, ApiError> {
    let text = tokenizer.render(messages, true).map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    check_length(tokenizer.fewest_tokens(&text), false, context)?;
    tokenizer.encode(&text, false).map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))
}
