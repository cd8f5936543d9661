//! Generation: prefill the prompt (in passes of `--prefill-chunk` tokens), then decode one token at a time, sampling,
//! streaming text and stopping on EOS, stop strings or length. The caller owns the loop: it
//! steps a [`Generation`] with `&mut Model`, and may change settings between steps.

use std::time::Instant;

use ferry_shaders::launches::{self, Launches};

use crate::chat::ChatTokenizer;
use crate::error::{FerryError, Result};
use crate::experts::ExpertStats;
use crate::graph::{KvCache, LogitsFor, Model};
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
    /// Ferry's kernel launches and host read-backs of all decode steps.
    pub decode_kernels: KernelStats,
    /// GPU bytes of the KV cache's pages at the end (f32; pages are allocated as reached).
    pub kv_cache_bytes: u64,
    /// Positions per KV cache page.
    pub kv_page_positions: usize,
}

/// Launches of Ferry's own kernels (ferry-shaders; burn's element-wise ops and matmuls are not
/// counted) and the parallelism they offered: figures that do not depend on the hardware.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct KernelStats {
    pub launches: u64,
    /// Units (invocations) those launches started.
    pub units: u64,
    /// Launches of the matrix kernels (matrix-vector products, grouped experts), their units,
    /// and the weight bytes they read.
    pub matrix_launches: u64,
    pub matrix_units: u64,
    pub weight_bytes: u64,
    /// Matrix launches that started fewer than 32,768 units (`GPU_UNITS`), and the lower bound of
    /// the smallest launch's units (a power of two; 0 without matrix launches).
    pub small_matrix_launches: u64,
    pub smallest_matrix_launch_units: u64,
    /// Times the host waited on a device read-back.
    pub host_reads: u64,
}

/// Units a matrix launch should offer a GPU: about 32k independent 16-byte loads keep a desktop
/// card's memory busy (bandwidth x latency / 16 bytes).
pub const GPU_UNITS: u64 = 1 << 15;

impl KernelStats {
    fn between(before: Launches, after: Launches, host_reads: usize) -> Self {
        let d = after - before;
        Self {
            launches: d.launches,
            units: d.units,
            matrix_launches: d.matrix_launches,
            matrix_units: d.matrix_units,
            weight_bytes: d.weight_bytes,
            small_matrix_launches: d.matrix_launches_below(GPU_UNITS),
            smallest_matrix_launch_units: d.smallest_matrix_launch().unwrap_or(0),
            host_reads: host_reads as u64,
        }
    }
}

impl std::ops::AddAssign for KernelStats {
    fn add_assign(&mut self, o: Self) {
        self.launches += o.launches;
        self.units += o.units;
        self.matrix_launches += o.matrix_launches;
        self.matrix_units += o.matrix_units;
        self.weight_bytes += o.weight_bytes;
        self.small_matrix_launches += o.small_matrix_launches;
        self.smallest_matrix_launch_units = match (self.smallest_matrix_launch_units, o.smallest_matrix_launch_units) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.host_reads += o.host_reads;
    }
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
    /// Ferry's kernel launches and host read-backs in the pass.
    pub kernels: KernelStats,
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
    /// After each forward pass (boxed: its counters outweigh the other variants).
    Step(Box<StepStats>),
    Finished(Box<GenerateStats>),
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

    /// Generates to the end, handing each event to `on_event`: the simplest caller of
    /// [`Generation`]. Callers that change settings or stop between tokens step it themselves.
    pub fn generate(&mut self, request: &GenerateRequest, on_event: impl FnMut(&Event)) -> Result<GenerateOutput> {
        generate(&mut self.model, self.tokenizer.as_ref(), request, on_event)
    }
}

/// Generates to the end with `model`, handing each event to `on_event` (see `Engine::generate`).
pub fn generate(
    model: &mut Model,
    tokenizer: Option<&ChatTokenizer>,
    request: &GenerateRequest,
    mut on_event: impl FnMut(&Event),
) -> Result<GenerateOutput> {
    let mut generation = Generation::new(model, request.clone())?;
    while !generation.is_finished() {
        for event in generation.step(model, tokenizer)? {
            on_event(&event);
        }
    }
    generation.into_output()
}

/// One generation in progress, stepped by its caller one forward pass at a time: the prompt
/// first, then one token per step. The caller owns the loop, so between two steps it may read
/// the model's expert cache, change its settings (`Model::set_expert_options`) or stop
/// (`Generation::cancel`).
pub struct Generation {
    request: GenerateRequest,
    cache: KvCache,
    sampler: Sampler,
    history: Vec<u32>,
    generated: Vec<u32>,
    text: TextStream,
    start: Instant,
    /// The next token's logits; None before the prompt's pass.
    logits: Option<Vec<f32>>,
    prefill_seconds: f64,
    first_token_at: Option<f64>,
    /// Expert and lookup counters when generation started and after the prompt's pass.
    experts_at: [ExpertStats; 2],
    lookup_at: [LookupStats; 2],
    /// Kernel launches and read-backs of the decode steps so far.
    decode_kernels: KernelStats,
    stats: Option<GenerateStats>,
}

impl Generation {
    /// Checks the request against the model and allocates its KV cache; runs nothing yet.
    pub fn new(model: &Model, request: GenerateRequest) -> Result<Self> {
        let prompt = &request.prompt_ids;
        let context = model.spec().max_position_embeddings;
        if prompt.is_empty() {
            return Err(FerryError::Empty("the prompt has no tokens".into()));
        }
        if prompt.len() >= context {
            return Err(FerryError::ContextExceeded { prompt: prompt.len(), new: request.max_new_tokens, context });
        }
        let limit = model.context_limit();
        if prompt.len() >= limit {
            return Err(model.beyond_reserve(prompt.len()));
        }
        // Saturating: `--max-new-tokens` may be any usize, and "until the context is full" is
        // what a huge one asks for.
        let capacity = prompt.len().saturating_add(request.max_new_tokens).min(limit);
        let cache = model.new_cache(capacity)?;
        let experts = model.experts().stats();
        let lookup = model.lookup_stats();
        Ok(Self {
            cache,
            sampler: Sampler::new(request.sampling.clone()),
            history: prompt.clone(),
            generated: Vec::new(),
            text: TextStream::new(request.stop_strings.clone()),
            start: Instant::now(),
            logits: None,
            prefill_seconds: 0.0,
            first_token_at: None,
            experts_at: [experts; 2],
            lookup_at: [lookup; 2],
            decode_kernels: KernelStats::default(),
            stats: None,
            request,
        })
    }

    /// Whether the generation has ended (its last step returned `Event::Finished`).
    pub fn is_finished(&self) -> bool {
        self.stats.is_some()
    }

    /// Whether the prompt's pass has run.
    pub fn started(&self) -> bool {
        self.logits.is_some()
    }

    /// Runs the next forward pass and returns what it produced: the prompt's `Step` on the
    /// first call; then a sampled `Token` and its `Step`, until a stop condition ends the
    /// generation with `Finished`. Nothing once finished.
    pub fn step(&mut self, model: &mut Model, tokenizer: Option<&ChatTokenizer>) -> Result<Vec<Event>> {
        if self.is_finished() {
            return Ok(Vec::new());
        }
        let Some(logits) = &self.logits else {
            let prompt = self.request.prompt_ids.clone();
            self.start = Instant::now();
            let launched = launches::counted();
            let out = model.forward(&prompt, &mut self.cache, LogitsFor::Last)?;
            let kernels = KernelStats::between(launched, launches::counted(), out.host_reads);
            let logits = finite(last_logits(out.logits)?, 0)?;
            self.prefill_seconds = self.start.elapsed().as_secs_f64();
            self.logits = Some(logits);
            self.experts_at[1] = model.experts().stats();
            self.lookup_at[1] = model.lookup_stats();
            let experts = self.experts_at[1] - self.experts_at[0];
            let lookup = self.lookup_at[1] - self.lookup_at[0];
            let stats = step_stats(model, 0, prompt.len(), self.prefill_seconds, experts, lookup, kernels);
            return Ok(vec![Event::Step(Box::new(stats))]);
        };
        let mut events = Vec::new();
        if self.generated.len() >= self.request.max_new_tokens {
            return Ok(self.finish(model, StopReason::MaxNewTokens, events));
        }
        let id = self.sampler.sample(logits, &self.history);
        self.first_token_at.get_or_insert_with(|| self.start.elapsed().as_secs_f64());
        if self.request.stop_at_eos && model.spec().eos_token_ids.contains(&id) {
            return Ok(self.finish(model, StopReason::Eos, events));
        }
        self.generated.push(id);
        self.history.push(id);
        let (delta, stopped) = match tokenizer {
            Some(tok) => self.text.update(tok.decode(&self.generated)?),
            None => (String::new(), false),
        };
        events.push(Event::Token { id, text: delta });
        if stopped {
            return Ok(self.finish(model, StopReason::StopString, events));
        }
        if self.generated.len() >= self.request.max_new_tokens {
            return Ok(self.finish(model, StopReason::MaxNewTokens, events));
        }
        if self.history.len() >= model.spec().max_position_embeddings {
            return Ok(self.finish(model, StopReason::Context, events));
        }
        let step_start = Instant::now();
        let experts_before = model.experts().stats();
        let lookup_before = model.lookup_stats();
        let launched = launches::counted();
        let out = model.forward(&[id], &mut self.cache, LogitsFor::Last)?;
        let kernels = KernelStats::between(launched, launches::counted(), out.host_reads);
        self.decode_kernels += kernels;
        self.logits = Some(finite(last_logits(out.logits)?, self.generated.len())?);
        let experts = model.experts().stats() - experts_before;
        let lookup = model.lookup_stats() - lookup_before;
        let seconds = step_start.elapsed().as_secs_f64();
        let stats = step_stats(model, self.generated.len(), 1, seconds, experts, lookup, kernels);
        events.push(Event::Step(Box::new(stats)));
        Ok(events)
    }

    /// Ends the generation now, as the caller's stop button does: `Finished` with
    /// `StopReason::Cancelled` (nothing if it had already finished).
    pub fn cancel(&mut self, model: &Model) -> Vec<Event> {
        if self.is_finished() {
            return Vec::new();
        }
        self.finish(model, StopReason::Cancelled, Vec::new())
    }

    /// The tokens, text and statistics of a finished generation.
    pub fn into_output(self) -> Result<GenerateOutput> {
        let stats = self.stats.ok_or_else(|| FerryError::Empty("the generation has not finished".into()))?;
        Ok(GenerateOutput { ids: self.generated, text: self.text.text, stats })
    }

    /// Closes the generation with `reason`: what the text held back, then `Finished`.
    fn finish(&mut self, model: &Model, reason: StopReason, mut events: Vec<Event>) -> Vec<Event> {
        let total = self.start.elapsed().as_secs_f64();
        let ttft = self.first_token_at.unwrap_or(total);
        let decode_seconds = total - ttft;
        let (prompt, new) = (self.request.prompt_ids.len(), self.generated.len());
        let stats = GenerateStats {
            prompt_tokens: prompt,
            new_tokens: new,
            prefill_seconds: self.prefill_seconds,
            decode_seconds,
            time_to_first_token_seconds: ttft,
            prefill_tokens_per_second: prompt as f64 / self.prefill_seconds.max(1e-9),
            decode_tokens_per_second: new.saturating_sub(1) as f64 / decode_seconds.max(1e-9),
            stop_reason: reason,
            prefill_experts: self.experts_at[1] - self.experts_at[0],
            decode_experts: model.experts().stats() - self.experts_at[1],
            prefill_lookup: self.lookup_at[1] - self.lookup_at[0],
            decode_lookup: model.lookup_stats() - self.lookup_at[1],
            decode_kernels: self.decode_kernels,
            kv_cache_bytes: self.cache.bytes(),
            kv_page_positions: self.cache.page_positions(),
        };
        let tail = self.text.finish();
        if !tail.is_empty() {
            events.push(Event::Token { id: *self.generated.last().unwrap_or(&0), text: tail });
        }
        events.push(Event::Finished(Box::new(stats.clone())));
        self.stats = Some(stats);
        events
    }
}

/// The one row of logits a `LogitsFor::Last` pass returns.
fn last_logits(rows: Vec<Vec<f32>>) -> Result<Vec<f32>> {
    rows.into_iter().next().ok_or_else(|| FerryError::Gpu("the forward pass returned no logits".into()))
}

/// The logits of forward pass `step` (0: the prompt), if every value is finite: a NaN or Inf
/// (a weight that slipped past the load checks, an activation that overflowed) would make
/// sampling pick tokens from garbage.
fn finite(logits: Vec<f32>, step: usize) -> Result<Vec<f32>> {
    match logits.iter().position(|v| !v.is_finite()) {
        None => Ok(logits),
        Some(token) => Err(FerryError::NonFinite(format!(
            "step {step}: the logits hold {} (token {token}); a weight or activation overflowed, so nothing can be \
             sampled",
            logits[token]
        ))),
    }
}

#[allow(clippy::too_many_arguments)] // the step's figures, gathered into one record
fn step_stats(
    model: &Model,
    step: usize,
    tokens: usize,
    seconds: f64,
    experts: ExpertStats,
    lookup: LookupStats,
    kernels: KernelStats,
) -> StepStats {
    let resident_per_layer = model.experts().resident_per_layer();
    StepStats { step, tokens, seconds, experts, lookup, resident_per_layer, kernels }
}

/// Turns the full decoded text after each token into the newly printable part, holding back
/// an incomplete UTF-8 character and anything that might be the start of a stop string.
struct TextStream {
    stops: Vec<String>,
    /// The text produced so far (cut before a stop string once one is found).
    text: String,
    emitted: usize,
}

impl TextStream {
    fn new(stops: Vec<String>) -> Self {
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
        // Replacement chars at the end are a multi-byte character still arriving.
        let arrived = self.text.trim_end_matches('\u{FFFD}').len();
        let mut safe = arrived;
        for stop in &self.stops {
            for len in (1..stop.len()).rev() {
                // Measured from `arrived`, so the cut is a character boundary of the text too.
                if stop.is_char_boundary(len) && self.text[..arrived].ends_with(&stop[..len]) {
                    safe = safe.min(arrived - len);
                    break;
                }
            }
        }
        (self.take(safe), false)
    }

    /// The text from what was emitted up to `end`. A decoded text that changed behind what was
    /// already emitted (a tokenizer may merge bytes differently) emits nothing rather than panic.
    fn take(&mut self, end: usize) -> String {
        if end <= self.emitted || !self.text.is_char_boundary(end) || !self.text.is_char_boundary(self.emitted) {
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
        let stops = ["<end>".to_string()];
        let mut s = TextStream::new(stops.to_vec());
        assert_eq!(s.update("Hello".into()), ("Hello".into(), false));
        assert_eq!(s.update("Hello <e".into()), (" ".into(), false));
        assert_eq!(s.update("Hello <end> more".into()), ("".into(), true));
        assert_eq!(s.text, "Hello ");
    }

    #[test]
    fn a_partial_stop_string_that_does_not_complete_is_released() {
        let stops = ["<end>".to_string()];
        let mut s = TextStream::new(stops.to_vec());
        assert_eq!(s.update("a <e".into()), ("a ".into(), false));
        assert_eq!(s.update("a <ex".into()), ("<ex".into(), false));
    }

    /// A non-ASCII stop string whose first character matches while the next one is still
    /// arriving (a replacement char at the end) holds back at a character boundary.
    #[test]
    fn a_non_ascii_stop_string_beside_a_partial_character_does_not_panic() {
        let stops = ["é日本".to_string()];
        let mut s = TextStream::new(stops.to_vec());
        assert_eq!(s.update("xé\u{FFFD}".into()), ("x".into(), false));
        assert_eq!(s.update("xé日\u{FFFD}".into()), ("".into(), false));
        assert_eq!(s.update("xé日本 more".into()), ("".into(), true));
        assert_eq!(s.text, "x");
        let mut s = TextStream::new(vec!["日本".to_string()]);
        assert_eq!(s.update("a日\u{FFFD}".into()), ("a".into(), false));
        assert_eq!(s.update("a日x".into()), ("日x".into(), false));
    }

    #[test]
    fn a_decoded_text_that_shrinks_behind_the_emitted_part_emits_nothing() {
        let mut s = TextStream::new(Vec::new());
        assert_eq!(s.update("日本".into()), ("日本".into(), false));
        assert_eq!(s.update("日".into()), ("".into(), false));
        assert_eq!(s.update("a".into()), ("".into(), false));
        assert_eq!(s.finish(), "");
    }

    /// Property, over seeded random texts of 1- to 4-byte characters arriving in random byte
    /// chunks (so prefixes end in partial characters) and random stop strings cut from such
    /// texts: streaming never panics, and the deltas add up to exactly the text before the
    /// first stop string found, or the whole text.
    #[test]
    fn streamed_deltas_add_up_to_the_text_before_the_first_stop() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "ab <>\u{e9}\u{df}\u{65e5}\u{672c}\u{1F600}".chars().collect();
        let random_text = |rng: &mut StdRng, lengths: std::ops::Range<usize>| -> String {
            let len = rng.random_range(lengths);
            (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect()
        };
        for seed in 0..2000 {
            let mut rng = StdRng::seed_from_u64(seed);
            let text = random_text(&mut rng, 0..24);
            let count = rng.random_range(0..3);
            let stops: Vec<String> = (0..count).map(|_| random_text(&mut rng, 1..4)).collect();
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = (0..rng.random_range(0..8)).map(|_| rng.random_range(0..=bytes.len())).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            // The reference: the first decoded prefix that holds a stop string ends the text at
            // that prefix's earliest stop.
            let mut expected = text.clone();
            let mut stream = TextStream::new(stops.clone());
            let mut streamed = String::new();
            let mut stopped = false;
            for &cut in &cuts {
                let decoded = String::from_utf8_lossy(&bytes[..cut]).into_owned();
                if let Some(at) = stops.iter().filter_map(|s| decoded.find(s.as_str())).min() {
                    expected = decoded[..at].to_string();
                    let (delta, found) = stream.update(decoded);
                    streamed += &delta;
                    assert!(found, "seed {seed}");
                    stopped = true;
                    break;
                }
                let (delta, found) = stream.update(decoded);
                assert!(!found, "seed {seed}");
                streamed += &delta;
            }
            streamed += &stream.finish();
            if !stopped {
                assert_eq!(streamed, text, "seed {seed}: {text:?}, stops {stops:?}");
            } else {
                assert_eq!(streamed, expected, "seed {seed}: {text:?}, stops {stops:?}");
            }
        }
    }

    #[test]
    fn incomplete_characters_wait_for_their_bytes() {
        let mut s = TextStream::new(Vec::new());
        assert_eq!(s.update("caf\u{FFFD}".into()), ("caf".into(), false));
        assert_eq!(s.update("café".into()), ("é".into(), false));
    }
}
