//! Command-line arguments.

use std::path::PathBuf;
use std::str::FromStr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_runtime::lut::LutDtype;
use ferry_runtime::options::{
    AdapterChoice, BigFallback, ByteSize, DEFAULT_PREFILL_CHUNK, DecodeSplit, DenseDtype, EvictionPolicy, ExpertDtype,
    ExpertsMode, Importance, LinkModel, MissPolicy, OptionError, PrefetchMode, Routing, UploadPath, VramBudget,
};
use strum::VariantNames;

/// A flag whose values are one of the runtime's option enums: the accepted values (in help
/// and errors) are the enum's own list.
fn choice<T>() -> impl TypedValueParser<Value = T>
where
    T: FromStr + VariantNames + Clone + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    PossibleValuesParser::new(T::VARIANTS).try_map(|s| s.parse::<T>())
}

/// A flag parsed by the runtime's `FromStr` (sizes, budgets, adapters); clap names the flag, so
/// the error says only what is wrong.
fn parsed<T: FromStr<Err = OptionError>>(text: &str) -> Result<T, String> {
    text.parse().map_err(|e: OptionError| e.message)
}

/// A number of tokens, at least 1; `k` multiplies by 1024 (`32k`).
fn token_count(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, scale) = match text.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (text, 1),
    };
    match digits.parse::<usize>().ok().and_then(|n| n.checked_mul(scale)) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("{text:?} is not a number of tokens (e.g. 1024 or 4k)")),
    }
}

/// A count that must be at least 1.
fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("must be a whole number of at least 1".to_string()),
    }
}

/// `--cpu-threads`: enough for any machine, few enough that a typo does not start a million
/// threads before the pool fails.
fn thread_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {MAX_THREADS}")),
    }
}

const MAX_THREADS: usize = 1024;

/// A whole-number flag; the error states the accepted range (clap's own says "invalid digit").
fn whole<T: FromStr>(max: u64) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |text: &str| text.trim().parse().map_err(|_| format!("must be a whole number from 0 to {max}"))
}

/// `--link-gbps`: checked by the runtime's link model, so the range is stated once.
fn gbps(text: &str) -> Result<f64, String> {
    let gbps: f64 = text.parse().map_err(|_| "must be a number of GB/s".to_string())?;
    LinkModel::checked(gbps).map(|_| gbps).map_err(|e| e.message)
}

/// `--expert-dtype`: a format, or `auto` (the format the folder stores, else f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertDtypeChoice {
    Auto,
    Fixed(ExpertDtype),
}

fn expert_dtype_choice() -> impl TypedValueParser<Value = ExpertDtypeChoice> {
    let names = std::iter::once("auto").chain(ExpertDtype::VARIANTS.iter().copied());
    PossibleValuesParser::new(names).try_map(|s| match s.as_str() {
        "auto" => Ok(ExpertDtypeChoice::Auto),
        other => other.parse().map(ExpertDtypeChoice::Fixed),
    })
}

/// `--dense-dtype`: a format, or `auto` (the checkpoint's own width, else f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDtypeChoice {
    Auto,
    Fixed(DenseDtype),
}

fn dense_dtype_choice() -> impl TypedValueParser<Value = DenseDtypeChoice> {
    let names = std::iter::once("auto").chain(DenseDtype::VARIANTS.iter().copied());
    PossibleValuesParser::new(names).try_map(|s| match s.as_str() {
        "auto" => Ok(DenseDtypeChoice::Auto),
        other => other.parse().map(DenseDtypeChoice::Fixed),
    })
}

/// A `--link-gbps` entry of `ferry bench`: `none` (the adapter's own speed) or GB/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkChoice(pub Option<LinkModel>);

fn link_choice(text: &str) -> Result<LinkChoice, String> {
    if text == "none" {
        return Ok(LinkChoice(None));
    }
    let gbps: f64 = text.parse().map_err(|_| "use none or a number of GB/s".to_string())?;
    LinkModel::checked(gbps).map(|l| LinkChoice(Some(l))).map_err(|e| e.message)
}

/// `ferry train --arch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainArch {
    /// A one-expert Mixtral.
    Dense,
    /// Mixtral, top-k.
    Moe,
    /// Pre-gated MoE: block N's pre-gate chooses block N+1's experts (run it with
    /// --pregate-routing).
    PregatedMoe,
    /// FerryMoleForCausalLM.
    Mole,
}

/// `ferry train --device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainDevice {
    /// The default wgpu adapter (lavapipe on a machine without a GPU).
    Wgpu,
    /// burn's ndarray backend on the CPU (a build with `--features cpu-train`).
    #[value(alias = "cpu")]
    Ndarray,
}

#[derive(Parser)]
#[command(name = "ferry", version, about = "Run Mixture-of-Experts language models on laptop GPUs through wgpu")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Chat in the terminal with the model's chat template and history.
    Chat(ChatArgs),
    /// Print logits (and routing) for token ids as one JSON object.
    Logits(LogitsArgs),
    /// Describe a model: family, layers, experts, parameter and byte counts.
    Info(InfoArgs),
    /// List the wgpu adapters on this machine.
    Devices(DevicesArgs),
    /// Measure all-resident and offloaded modes in one run (tokens/s, hit rate, bytes/token).
    Bench(BenchArgs),
    /// Write a random-weight MoE with the shapes of a real one (for benchmarks; gibberish out).
    RandomModel(RandomModelArgs),
    /// Quality of a mode against full mode on a text: perplexity and argmax agreement.
    Eval(EvalArgs),
    /// Convert a model: `mole-to-lut` re-parameterises MoLE experts into a lookup table,
    /// `quantize` stores routed experts quantised.
    #[command(subcommand)]
    Convert(ConvertCommand),
    /// Train a small dense, MoE or MoLE model on text files (burn autodiff, CPU by default).
    Train(TrainArgs),
    /// The desktop app: chat with live expert residency and throughput (egui).
    Gui(GuiArgs),
    /// Record the routing of a text, one token per forward pass after a short prompt: per token
    /// and MoE layer the experts, their weights and the predictor's guess (JSON lines).
    Trace(TraceArgs),
    /// Replay a routing trace through the cache's eviction policies at several budgets, next to
    /// Belady's optimal hit rate for the same slots.
    CacheSim(CacheSimArgs),
    /// Learned next-layer expert predictors (`--prefetch learned`).
    #[command(subcommand)]
    Predictor(PredictorCommand),
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health, /metrics).
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to run (teacher-forced).
    #[arg(long)]
    pub text: PathBuf,
    /// Trace file to write (JSON lines: a header, one line per forward pass and MoE layer, and
    /// the run's own cache counts at the end).
    #[arg(long)]
    pub out: PathBuf,
    /// Run at most this many tokens of the text.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub max_tokens: usize,
    /// Tokens per sequence: the text runs in windows of this many, each from an empty KV cache.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub window: usize,
    /// Tokens of each window run as one prompt pass; the rest run one per pass, as decoding.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub prompt_tokens: usize,
}

#[derive(Args)]
pub struct CacheSimArgs {
    /// A trace written by `ferry trace`.
    pub trace: PathBuf,
    /// Budgets as shares of the routed experts (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_values = ["5%", "12.5%", "25%", "50%"], value_parser = parsed::<VramBudget>)]
    pub budget: Vec<VramBudget>,
    /// Eviction policies to replay (comma-separated or repeated; default: all).
    #[arg(long, value_delimiter = ',', value_parser = choice::<EvictionPolicy>())]
    pub policy: Vec<EvictionPolicy>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum PredictorCommand {
    /// Fit a linear predictor per MoE layer (its router input to the next MoE layer's router
    /// logits) on a calibration text, report recall on held-out tokens against the plug-and-play
    /// pre-gate, and write it beside the model (predictor.safetensors).
    Fit(PredictorFitArgs),
}

#[derive(Args)]
pub struct PredictorFitArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text.
    #[arg(long)]
    pub text: PathBuf,
    /// Use at most this many tokens of the text.
    #[arg(long, default_value_t = 4096, value_parser = positive)]
    pub max_tokens: usize,
    /// Tokens per sequence: the text runs in windows of this many, each from an empty KV cache.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub window: usize,
    /// Share of the tokens (the last ones) held out to measure recall, from 0.05 to 0.5.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    /// Ridge penalty, relative to the inputs' mean square (0 to 1).
    #[arg(long, default_value_t = 1e-3)]
    pub ridge: f64,
    /// ReLU units of the hidden layer fitted on top of the linear map (0: the map alone).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub hidden: u32,
    /// Passes over the calibration tokens to train the hidden layer (1 to 1000).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub epochs: u32,
    /// Where to write the predictor (default: predictor.safetensors in the model folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080, value_parser = whole::<u16>(u16::MAX.into()))]
    pub port: u16,
    /// The model's name in the API (`model` in requests, /v1/models). Default: the --model
    /// value as given, or "ferry-default" for the built-in model.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests generated at the same time, one token each in turn (the rest wait in the queue).
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub parallel: usize,
    /// Requests that may wait for a turn; beyond it a request is answered 503.
    #[arg(long, default_value_t = 32, value_parser = whole::<usize>(1 << 20))]
    pub max_queue: usize,
    /// Open connections at most; beyond it a new connection is answered 503 and closed.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub max_connections: usize,
    /// Largest request body (e.g. 4MiB); a larger one is answered 413.
    #[arg(long, default_value = "8MiB", value_parser = |s: &str| s.parse::<ByteSize>().map_err(|e| e.message))]
    pub max_body: ByteSize,
    /// Defaults for requests that leave a setting out (`max_tokens`, `temperature`, `seed`, ...).
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct GuiArgs {
    /// The model to open at start (the built-in default without --model); the app can open
    /// another folder later. The expert flags set the controls' starting values.
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt of the chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per reply at most (changeable in the app).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Scripted run, for tests and demos: once the model is loaded, send this prompt; when the
    /// reply is done, write --screenshot and --state-out and quit.
    #[arg(long)]
    pub script_prompt: Option<String>,
    /// PNG of the window at the end of a scripted run.
    #[arg(long, requires = "script_prompt")]
    pub screenshot: Option<PathBuf>,
    /// JSON of the app's state at the end of a scripted run (tokens, residency changes, adapter).
    #[arg(long, requires = "script_prompt")]
    pub state_out: Option<PathBuf>,
    /// A scripted run that has not finished after this many seconds fails.
    #[arg(long, default_value_t = 600)]
    pub script_timeout: u64,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The architecture to train.
    #[arg(long, value_enum)]
    pub arch: TrainArch,
    /// Text files to train on (the last 5% of tokens are held out for validation).
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Output model folder; if it holds a run (trainer_state.json), training resumes.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Experts per layer (default: moe 8, mole 4).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token for moe.
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Active feed-forward width per token: the dense FFN, top-k x the MoE expert size, the MoLE
    /// shared FFN (and each lookup expert).
    #[arg(long, default_value_t = 256)]
    pub ffn: usize,
    /// BPE vocabulary size.
    #[arg(long, default_value_t = 2048)]
    pub vocab: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Peak learning rate (warm-up 50 steps, cosine to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Validate and checkpoint every this many steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = TrainDevice::Wgpu)]
    pub device: TrainDevice,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write model.safetensors in bf16 (half the bytes; the f32 master weights stay in
    /// optimizer.safetensors for resuming).
    #[arg(long)]
    pub save_bf16: bool,
}

#[derive(Subcommand)]
pub enum ConvertCommand {
    /// Evaluate every lookup expert on every vocabulary entry and write a complete model folder
    /// (config, non-expert weights, tokenizer, mole_lut.bin) that runs from the table.
    MoleToLut(MoleToLutArgs),
    /// Quantise the routed experts once and write a model folder that stores them in the GPU
    /// slots' layout (loading then maps and uploads them without quantising).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model folder (any supported family).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (created; must not hold a model).
    #[arg(long)]
    pub out: PathBuf,
    /// Expert format, a quantised one (an MXFP4 checkpoint converted to mxfp4 stays exact).
    #[arg(long, value_parser = choice::<ExpertDtype>())]
    pub dtype: ExpertDtype,
}

#[derive(Args)]
pub struct MoleToLutArgs {
    /// MoLE model folder with the expert FFNs (FerryMoleForCausalLM).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (created; must not hold a model).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored element type of the table: f32 (exact) or f16 (half the bytes, rounded).
    #[arg(long, default_value_t = LutDtype::F32, value_parser = choice::<LutDtype>())]
    pub dtype: LutDtype,
    /// GPU adapter that evaluates the experts: default, cpu, discrete[:N], integrated[:N] or
    /// virtual[:N].
    #[arg(long, default_value = "default", value_parser = parsed::<AdapterChoice>)]
    pub adapter: AdapterChoice,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// HuggingFace model folder (config.json, *.safetensors, tokenizer.json), or a hub name
    /// ORG/NAME[@REVISION] from the local HuggingFace cache, downloaded into it if missing
    /// (HF_ENDPOINT, HF_TOKEN; HF_HUB_OFFLINE=1 never downloads). Default: Ferry's built-in
    /// model, generated into the cache folder on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GPU adapter: default, cpu, discrete[:N], integrated[:N] or virtual[:N].
    #[arg(long, default_value = "default", value_parser = parsed::<AdapterChoice>)]
    pub adapter: AdapterChoice,
    /// GPU memory for the model: a size (1.5GiB, 300MiB) for everything, or a share of the
    /// routed experts' bytes (25%). Experts that do not fit stay in host RAM and are uploaded
    /// on demand. Default: all experts resident.
    #[arg(long, default_value = "all", value_parser = parsed::<VramBudget>)]
    pub vram_budget: VramBudget,
    /// Which resident expert makes room for a missing one.
    #[arg(long, default_value_t = EvictionPolicy::Lru, value_parser = choice::<EvictionPolicy>())]
    pub expert_policy: EvictionPolicy,
    /// Expert usage profile (JSON from --save-expert-profile) that lfu-pinned pins from.
    #[arg(long)]
    pub expert_profile: Option<PathBuf>,
    /// Fetch the next layer's predicted experts while this layer computes (pregate; exact: the
    /// real routing still decides, mispredictions are fetched on demand).
    #[arg(long, default_value_t = PrefetchMode::None, value_parser = choice::<PrefetchMode>())]
    pub prefetch: PrefetchMode,
    /// Predict this many experts beyond top-k for prefetching.
    #[arg(long, default_value_t = 0)]
    pub prefetch_extra: usize,
    /// The predictor's choice is the next MoE layer's routing (Pre-gated MoE as trained by
    /// `ferry train --arch pregated-moe`; an approximation on any other model).
    #[arg(long)]
    pub pregate_routing: bool,
    /// Emulate a host-to-GPU link of this many GB/s (1e9 bytes/s) for every expert upload,
    /// e.g. 16 or 32 for PCIe 4.0 x8/x16, to see what a discrete GPU would.
    #[arg(long, allow_negative_numbers = true, value_parser = gbps)]
    pub link_gbps: Option<f64>,
    #[command(flatten)]
    pub big_little: BigLittleArgs,
    /// MoLE lookup tables: host RAM for decoded rows (e.g. 64MiB); 0 reads every row from the
    /// memory-mapped table (the OS page cache).
    #[arg(long, default_value = "0", value_parser = |s: &str| s.parse::<ByteSize>().map_err(|e| e.message))]
    pub lut_cache: ByteSize,
    /// How routed experts are stored in host RAM and GPU slots: f32 (exact), f16 (half the
    /// bytes; exact for F16 checkpoints and BF16 ones within f16's range; needs shader-f16), bf16
    /// (half the bytes; exact for BF16 checkpoints, uploaded as stored), group-wise int8 / int4 /
    /// int3 / int2 (32 weights per scale) or mxfp4, dequantised inside the expert kernel
    /// (approximate, except mxfp4 on an MXFP4 checkpoint); auto: the checkpoint's own width (bf16
    /// for BF16, mxfp4 for MXFP4, a converted folder's format), else f32.
    #[arg(long, default_value = "auto", value_parser = expert_dtype_choice())]
    pub expert_dtype: ExpertDtypeChoice,
    /// How projection matrices (attention, dense and shared FFNs, routers, LM head) are stored
    /// on the GPU: f32 (exact), f16 (half their bytes and memory, products summed in f32;
    /// approximate; needs shader-f16), bf16 (half the bytes; exact for BF16 checkpoints); auto:
    /// the checkpoint's own width (bf16 for BF16), else f32.
    #[arg(long, default_value = "auto", value_parser = dense_dtype_choice())]
    pub dense_dtype: DenseDtypeChoice,
    /// How decode kernels share each dot product among GPU units: auto (split into up to 64
    /// chunks on a GPU, whole on a CPU adapter such as lavapipe) or the most ways, a power of
    /// two from 1 (whole) to 64. Logits differ between settings by float rounding only.
    #[arg(long, default_value = "auto", value_parser = parsed::<DecodeSplit>)]
    pub decode_split: DecodeSplit,
    /// How a missed expert reaches the GPU: staging (Ferry's own mapped staging buffers; f32
    /// and bf16 experts), burn (burn's from_data), or auto (staging on a GPU, burn on a CPU
    /// adapter such as lavapipe, where a separate copy submission stalls). The bytes and results
    /// are the same.
    #[arg(long, default_value_t = UploadPath::Auto, value_parser = choice::<UploadPath>())]
    pub upload: UploadPath,
    /// Where router logits become experts and weights: device (a kernel; with every expert
    /// resident a decode step then waits for the host twice, not once per MoE layer), host (the
    /// logits read back), or auto (device on a GPU, host on a CPU adapter such as lavapipe,
    /// where a launch costs more than the read). Weights differ between them by float rounding.
    #[arg(long, default_value_t = Routing::Auto, value_parser = choice::<Routing>())]
    pub route_on: Routing,
    /// What happens to a routed expert that is not on the GPU: upload (into a slot, exact),
    /// cpu (computed on the host from host memory while the GPU computes the resident ones;
    /// differs by float rounding; only free slots are filled, by the first experts used), or auto (per expert and step, whichever
    /// the measured link and host rates, the tokens routed to it and its expected reuse make
    /// cheaper). With cpu or auto, --vram-budget 0% keeps no expert on the GPU.
    #[arg(long, default_value_t = MissPolicy::Upload, value_parser = choice::<MissPolicy>())]
    pub miss_policy: MissPolicy,
    /// Threads of the host expert kernel, 1 to 1024 (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub cpu_threads: Option<usize>,
    /// Most prompt tokens per forward pass: a longer prompt runs in chunks of this many over the
    /// growing KV cache, which bounds a prefill's activations and expert work by the chunk, not
    /// the prompt (logits equal within float rounding).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK, allow_negative_numbers = true, value_parser = positive)]
    pub prefill_chunk: usize,
    /// Longest context (prompt and new tokens) to reserve KV cache for in GPU memory; a budget in
    /// bytes counts it (default there: the model's context, at most 4096), and a longer prompt is
    /// refused before any work. Default without a byte budget: the model's context.
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub max_context: Option<usize>,
}

#[derive(Args, Clone)]
pub struct BigLittleArgs {
    /// full (exact), or big-little: unimportant tokens use half the top-k experts (approximate).
    #[arg(long, default_value_t = ExpertsMode::Full, value_parser = choice::<ExpertsMode>())]
    pub experts: ExpertsMode,
    /// Token importance score for big-little: dropped-mass (router mass the little half drops),
    /// entropy (of the router), or attention (attention the token receives in the layer).
    #[arg(long, default_value_t = Importance::DroppedMass, value_parser = choice::<Importance>())]
    pub importance: Importance,
    /// Share of tokens kept big (full top-k).
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    pub big_fraction: f32,
    /// When a big token's expert is not resident: fetch (exact) or substitute a resident one.
    #[arg(long, default_value_t = BigFallback::Fetch, value_parser = choice::<BigFallback>())]
    pub big_fallback: BigFallback,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Always take the most likely token (the default unless --temperature is given).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<usize>(usize::MAX as u64))]
    pub top_k: usize,
    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalise tokens already seen (1.0: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<u64>(u64::MAX))]
    pub seed: u64,
    /// Maximum number of tokens to generate (at most what the context has room for).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = whole::<usize>(usize::MAX as u64))]
    pub max_new_tokens: usize,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, value_parser = whole::<u32>(u32::MAX.into()))]
    pub ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt", conflicts_with = "ids")]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (ids, text, timing, expert statistics) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write how often each expert was used to this JSON file (for --expert-profile).
    #[arg(long)]
    pub save_expert_profile: Option<PathBuf>,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true, allow_hyphen_values = true, value_parser = whole::<u32>(u32::MAX.into()))]
    pub ids: Vec<u32>,
    /// Logits for every position, not only the last.
    #[arg(long)]
    pub all_positions: bool,
    /// Include the experts each token was routed to, per layer.
    #[arg(long)]
    pub routing: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DevicesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// HuggingFace model folder; default: the built-in model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GPU adapter: default, cpu, discrete[:N], integrated[:N] or virtual[:N].
    #[arg(long, default_value = "default", value_parser = parsed::<AdapterChoice>)]
    pub adapter: AdapterChoice,
    /// Offloaded budgets to measure next to all-resident (repeatable; see generate --help);
    /// default 50%, or 25% with --compare.
    #[arg(long = "vram-budget", value_parser = parsed::<VramBudget>)]
    pub vram_budgets: Vec<VramBudget>,
    /// Every technique in one run: at each budget, offload with and without pre-gating, full and
    /// big-little experts, each with f32, f16, int8 and int4 experts (a MoLE model: its table).
    #[arg(long)]
    pub compare: bool,
    /// Expert formats to measure (repeatable or comma-separated); each quantised format loads its
    /// own copy of the model. All-resident f32 is always the baseline.
    #[arg(long = "expert-dtype", value_delimiter = ',', default_values_t = [ExpertDtype::F32], value_parser = choice::<ExpertDtype>())]
    pub expert_dtypes: Vec<ExpertDtype>,
    /// Projection formats to measure (comma-separated); each format other than f32 repeats every
    /// expert format on its own copy of the model.
    #[arg(long = "dense-dtype", value_delimiter = ',', default_values_t = [DenseDtype::F32], value_parser = choice::<DenseDtype>())]
    pub dense_dtypes: Vec<DenseDtype>,
    /// Eviction policies to measure at each budget (repeatable).
    #[arg(long = "expert-policy", value_delimiter = ',', default_values_t = [EvictionPolicy::Lru], value_parser = choice::<EvictionPolicy>())]
    pub expert_policies: Vec<EvictionPolicy>,
    /// How decode kernels split their dot products (see generate --help), for every mode.
    #[arg(long, default_value = "auto", value_parser = parsed::<DecodeSplit>)]
    pub decode_split: DecodeSplit,
    /// How missed experts are uploaded (see generate --help), for every mode.
    #[arg(long, default_value_t = UploadPath::Auto, value_parser = choice::<UploadPath>())]
    pub upload: UploadPath,
    /// Where routing runs (see generate --help); a list measures every mode under each.
    #[arg(long = "route-on", value_delimiter = ',', default_values_t = [Routing::Auto], value_parser = choice::<Routing>())]
    pub route_on: Vec<Routing>,
    /// Miss policies to measure for every offloaded mode (comma-separated, e.g.
    /// upload,cpu,auto; see generate --help).
    #[arg(long = "miss-policy", value_delimiter = ',', default_values_t = [MissPolicy::Upload], value_parser = choice::<MissPolicy>())]
    pub miss_policies: Vec<MissPolicy>,
    /// Threads of the host expert kernel, 1 to 1024 (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub cpu_threads: Option<usize>,
    /// Prefetch modes to measure at each budget and policy (repeatable or comma-separated).
    #[arg(long = "prefetch", value_delimiter = ',', default_values_t = [PrefetchMode::None], value_parser = choice::<PrefetchMode>())]
    pub prefetch: Vec<PrefetchMode>,
    /// Predict this many experts beyond top-k when prefetching.
    #[arg(long, default_value_t = 0)]
    pub prefetch_extra: usize,
    /// Every mode routes by the predictor's choice (see generate --help).
    #[arg(long)]
    pub pregate_routing: bool,
    /// Emulate a host-to-GPU link of this many GB/s for the offloaded modes (reported as
    /// emulated); repeatable or comma-separated, `none` for the adapter's own speed, e.g.
    /// `none,16` measures every offloaded mode both ways.
    #[arg(long, value_delimiter = ',', value_parser = link_choice, allow_hyphen_values = true)]
    pub link_gbps: Vec<LinkChoice>,
    /// Expert modes to measure at each budget, policy and prefetch mode (repeatable or
    /// comma-separated).
    #[arg(long = "experts", value_delimiter = ',', default_values_t = [ExpertsMode::Full], value_parser = choice::<ExpertsMode>())]
    pub experts: Vec<ExpertsMode>,
    /// Importance scores to measure for each big-little mode (repeatable or comma-separated).
    #[arg(long = "importance", value_delimiter = ',', default_values_t = [Importance::DroppedMass], value_parser = choice::<Importance>())]
    pub importances: Vec<Importance>,
    /// Share of tokens kept big in big-little modes.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    pub big_fraction: f32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Instead of the modes: prefill time, KV bytes, attention scratch and peak memory at each
    /// of these prompt lengths (comma-separated; `4k` is 4096), all experts resident.
    #[arg(long, value_delimiter = ',', value_parser = token_count)]
    pub prefill_curve: Vec<usize>,
    /// Most prompt tokens per forward pass (see generate --help).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK, allow_negative_numbers = true, value_parser = positive)]
    pub prefill_chunk: usize,
    /// Instead of the modes: this many concurrent requests through `ferry serve`'s scheduler
    /// (comma-separated, e.g. 1,2,4), each count on a fresh model at the first --vram-budget
    /// (default 25%), --expert-policy and --link-gbps (default 16): aggregate tokens/s and bytes
    /// uploaded per token.
    #[arg(long, value_delimiter = ',', value_parser = positive, conflicts_with = "prefill_curve")]
    pub streams: Vec<usize>,
    /// Tokens to generate per mode.
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Times every mode is measured, in interleaved rounds (all modes of an expert format, then
    /// again); tables report each mode's median run, JSON lists every run's decode tokens/s.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RandomModelArgs {
    /// Shapes: default, olmoe-1b-7b, mixtral-8x7b, qwen3-30b-a3b or deepseek-v2-lite (the released
    /// configs, BF16), mole (a small Mixture of Lookup Experts), or gpt-oss-20b (the released config, MXFP4 experts,
    /// 201088-entry vocabulary) (tokenizer: Ferry's 384-token one unless said).
    #[arg(long, default_value = "default", value_parser = PossibleValuesParser::new(ferry_models::random_model::PRESETS))]
    pub preset: String,
    /// Number of layers (default: the preset's).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to score (teacher-forced, in windows of the model's context).
    #[arg(long)]
    pub text: PathBuf,
    /// Score at most this many tokens of the text.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
