//! The generate loop: prefill the prompt in one pass, then decode one token at a time, sampling,
//! streaming text and stopping on EOS, stop strings or length.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::chat::ChatTokenizer;
use crate::error::{FerryError, Result};
use crate::experts::ExpertStats;
use crate::graph::{LogitsFor, Model};
use crate::lut::LookupStats;
use crate::sampling::{Sampler, SamplingConfig};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops when the text contains one of these; the text ends before it.
    pub stop_strings: Vec<String>,
    /// Stop at the model's EOS ids (off to force exactly `max_new_tokens`).
    pub stop_at_eos: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxNewTokens,
    /// The model's context is full.
    Context,
    /// The caller asked to stop (the desktop app's stop button).
    Cancelled,
}

/// Timings of one generation, in seconds and tokens per second.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub time_to_first_token_seconds: f64,
    pub prefill_tokens_per_second: f64,
    /// Tokens after the first, over the decode time.
    pub decode_tokens_per_second: f64,
    pub stop_reason: StopReason,
    /// Expert cache traffic of the prompt's forward pass.
    pub prefill_experts: ExpertStats,
    /// Expert cache traffic of all decode steps.
    pub decode_experts: ExpertStats,
    /// MoLE lookup-table traffic of the prompt's forward pass (zero for other models).
    pub prefill_lookup: LookupStats,
    /// MoLE lookup-table traffic of all decode steps.
    pub decode_lookup: LookupStats,
}

/// What one forward pass (the prompt, or one decoded token) did to the expert cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepStats {
    /// 0 for the prompt, then 1, 2, ... for each decoded token.
    pub step: usize,
    /// Tokens in the pass.
    pub tokens: usize,
    pub seconds: f64,
    pub experts: ExpertStats,
    /// MoLE lookup-table rows read and uploaded in the pass.
    pub lookup: LookupStats,
    /// Resident experts per layer after the pass.
    pub resident_per_layer: Vec<usize>,
}

/// Streamed while generating.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new token and the text it completes (may be empty while a character or a possible
    /// stop string is still incomplete).
    Token {
        id: u32,
        text: String,
    },
    /// After each forward pass.
    Step(StepStats),
    Finished(GenerateStats),
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    pub ids: Vec<u32>,
    pub text: String,
    pub stats: GenerateStats,
}

/// A loaded model and (optionally) its tokenizer.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Option<ChatTokenizer>,
}

impl Engine {
    pub fn new(model: Model, tokenizer: Option<ChatTokenizer>) -> Self {
        Self { model, tokenizer }
    }

    pub fn generate(&self, request: &GenerateRequest, on_event: impl FnMut(&Event)) -> Result<GenerateOutput> {
        self.generate_cancellable(request, &AtomicBool::new(false), on_event)
    }

    /// Like `generate`, but stops with `StopReason::Cancelled` before the next forward pass
    /// once `cancel` is set (from another thread).
    pub fn generate_cancellable(
        &self,
        request: &GenerateRequest,
        cancel: &AtomicBool,
        mut on_event: impl FnMut(&Event),
    ) -> Result<GenerateOutput> {
        let spec = self.model.spec();
        let prompt = &request.prompt_ids;
        let context = spec.max_position_embeddings;
        if prompt.is_empty() {
            return Err(FerryError::Empty("the prompt has no tokens".into()));
        }
        if prompt.len() >= context {
            return Err(FerryError::ContextExceeded { prompt: prompt.len(), new: request.max_new_tokens, context });
        }
        let capacity = (prompt.len() + request.max_new_tokens).min(context);
        let mut cache = self.model.new_cache(capacity)?;
        let mut sampler = Sampler::new(request.sampling.clone());
        let mut history = prompt.clone();
        let mut generated: Vec<u32> = Vec::new();
        let mut text = TextStream::new(&request.stop_strings);

        let start = Instant::now();
        let before = self.model.experts().stats();
        let lookup_start = self.model.lookup_stats();
        let mut logits = self.model.forward(prompt, &mut cache, LogitsFor::Last)?.logits.remove(0);
        let prefill_seconds = start.elapsed().as_secs_f64();
        let after_prefill = self.model.experts().stats();
        let lookup_after_prefill = self.model.lookup_stats();
        let lookup = lookup_after_prefill - lookup_start;
        on_event(&Event::Step(self.step_stats(0, prompt.len(), prefill_seconds, after_prefill - before, lookup)));
        let mut first_token_at = None;
        let stop_reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if generated.len() >= request.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            let id = sampler.sample(&logits, &history);
            first_token_at.get_or_insert_with(|| start.elapsed().as_secs_f64());
            if request.stop_at_eos && spec.eos_token_ids.contains(&id) {
                break StopReason::Eos;
            }
            generated.push(id);
            history.push(id);
            let (delta, stopped) = match &self.tokenizer {
                Some(tok) => text.update(tok.decode(&generated)?),
                None => (String::new(), false),
            };
            on_event(&Event::Token { id, text: delta });
            if stopped {
                break StopReason::StopString;
            }
            if generated.len() >= request.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if history.len() >= context {
                break StopReason::Context;
            }
            let step_start = Instant::now();
            let step_before = self.model.experts().stats();
            let lookup_before = self.model.lookup_stats();
            logits = self.model.forward(&[id], &mut cache, LogitsFor::Last)?.logits.remove(0);
            let experts = self.model.experts().stats() - step_before;
            let lookup = self.model.lookup_stats() - lookup_before;
            let seconds = step_start.elapsed().as_secs_f64();
            on_event(&Event::Step(self.step_stats(generated.len(), 1, seconds, experts, lookup)));
        };
        let total = start.elapsed().as_secs_f64();
        let ttft = first_token_at.unwrap_or(total);
        let decode_seconds = total - ttft;
        let stats = GenerateStats {
            prompt_tokens: prompt.len(),
            new_tokens: generated.len(),
            prefill_seconds,
            decode_seconds,
            time_to_first_token_seconds: ttft,
            prefill_tokens_per_second: prompt.len() as f64 / prefill_seconds.max(1e-9),
            decode_tokens_per_second: generated.len().saturating_sub(1) as f64 / decode_seconds.max(1e-9),
            stop_reason,
            prefill_experts: after_prefill - before,
            decode_experts: self.model.experts().stats() - after_prefill,
            prefill_lookup: lookup_after_prefill - lookup_start,
            decode_lookup: self.model.lookup_stats() - lookup_after_prefill,
        };
        let tail = text.finish();
        if !tail.is_empty() {
            on_event(&Event::Token { id: *generated.last().unwrap_or(&0), text: tail });
        }
        on_event(&Event::Finished(stats.clone()));
        Ok(GenerateOutput { ids: generated, text: text.text, stats })
    }
}

impl Engine {
    fn step_stats(
        &self,
        step: usize,
        tokens: usize,
        seconds: f64,
        experts: ExpertStats,
        lookup: LookupStats,
    ) -> StepStats {
        let resident_per_layer = self.model.experts().resident_per_layer();
        StepStats { step, tokens, seconds, experts, lookup, resident_per_layer }
    }
}

/// Turns the full decoded text after each token into the newly printable part, holding back
/// an incomplete UTF-8 character and anything that might be the start of a stop string.
struct TextStream<'a> {
    stops: &'a [String],
    /// The text produced so far (cut before a stop string once one is found).
    text: String,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self { stops, text: String::new(), emitted: 0 }
    }

    /// Returns the printable delta and whether a stop string was found.
    fn update(&mut self, decoded: String) -> (String, bool) {
        self.text = decoded;
        if let Some(cut) = self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text.find(s.as_str())).min()
        {
            self.text.truncate(cut);
            return (self.take(self.text.len()), true);
        }
        let mut safe = self.text.len();
        // A replacement char at the end is a multi-byte character still arriving.
        if self.text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        for stop in self.stops {
            for len in (1..stop.len()).rev() {
                if stop.is_char_boundary(len) && self.text[..safe].ends_with(&stop[..len]) {
                    safe = safe.min(self.text.len() - len);
                    break;
                }
            }
        }
        (self.take(safe), false)
    }

    fn take(&mut self, end: usize) -> String {
        if end <= self.emitted {
            return String::new();
        }
        let delta = self.text[self.emitted..end].to_string();
        self.emitted = end;
        delta
    }

    /// Whatever was held back, once generation is over.
    fn finish(&mut self) -> String {
        self.take(self.text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::TextStream;

    #[test]
    fn stop_strings_are_held_back_then_cut() {
        let stops = vec!["<end>".to_string()];
        let mut s = TextStream::new(&stops);
        assert_eq!(s.update("Hello".into()), ("Hello".into(), false));
        assert_eq!(s.update("Hello <e".into()), (" ".into(), false));
        assert_eq!(s.update("Hello <end> more".into()), ("".into(), true));
        assert_eq!(s.text, "Hello ");
    }

    #[test]
    fn a_partial_stop_string_that_does_not_complete_is_released() {
        let stops = vec!["<end>".to_string()];
        let mut s = TextStream::new(&stops);
        assert_eq!(s.update("a <e".into()), ("a ".into(), false));
        assert_eq!(s.update("a <ex".into()), ("<ex".into(), false));
    }

    #[test]
    fn incomplete_characters_wait_for_their_bytes() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.update("caf\u{FFFD}".into()), ("caf".into(), false));
        assert_eq!(s.update("café".into()), ("é".into(), false));
    }
}
