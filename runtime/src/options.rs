//! Every option a user sets, typed once: formats, policies, modes, budgets, the link model and
//! the adapter. A leaf: it imports nothing of Ferry, and everything may import it.
//!
//! Option enums derive their parsing and display (strum, kebab-case), and `VARIANTS` lists
//! their values, so the CLI's help, its errors and the runtime's messages read one list.

use std::str::FromStr;
use std::time::Duration;

use strum::VariantNames;

/// Weights sharing one scale in the quantised expert formats, along the reduction dimension
/// (`ferry_shaders::format::GROUP`, which the kernels are compiled for).
const QUANT_GROUP: usize = 32;

/// An option value that cannot be used, with the flag (or key) it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct OptionError {
    pub flag: String,
    pub message: String,
}

impl OptionError {
    pub fn new(flag: impl Into<String>, message: impl Into<String>) -> Self {
        Self { flag: flag.into(), message: message.into() }
    }
}

/// Parses one of an option enum's values; a value that is none of them is an error naming
/// `flag` and listing the accepted values.
pub fn parse_choice<T: FromStr + VariantNames>(flag: &str, value: &str) -> Result<T, OptionError> {
    value
        .parse()
        .map_err(|_| OptionError::new(flag, format!("unknown value {value:?}; use {}", T::VARIANTS.join(", "))))
}

/// How routed experts are stored in host RAM and in their GPU slots (`--expert-dtype`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum ExpertDtype {
    /// Exact: f32 as Ferry computes.
    #[default]
    F32,
    /// Half precision in the slots (loads in f16, sums in f32); needs `shader-f16`.
    F16,
    /// bfloat16 in the slots, two weights per 32-bit word widened by a shift in the kernel:
    /// exact for BF16 checkpoints (their bytes are uploaded as they are), needs no shader feature.
    Bf16,
    Int8,
    Int4,
    /// Symmetric 3-bit codes (-3..=3 times the group's scale), stored in bit planes.
    Int3,
    /// Symmetric 2-bit codes: each weight is -1, 0 or +1 times its group's scale.
    Int2,
    /// OCP MXFP4 as GPT-OSS ships it: e2m1 codes, one power-of-two scale per 32 weights. An
    /// MXFP4 checkpoint is uploaded as it is (exact); other checkpoints are rounded to it.
    Mxfp4,
}

impl ExpertDtype {
    /// Bits per quantised weight; None for the float formats (f32, f16).
    pub fn bits(self) -> Option<u32> {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => None,
            Self::Int8 => Some(8),
            Self::Int4 | Self::Mxfp4 => Some(4),
            Self::Int3 => Some(3),
            Self::Int2 => Some(2),
        }
    }

    /// Bits per weight in a slot's largest buffer (codes for quantised formats).
    pub fn weight_bits(self) -> u32 {
        match self {
            Self::F32 => 32,
            Self::F16 | Self::Bf16 => 16,
            other => other.bits().unwrap_or(32),
        }
    }

    /// Whether codes are e2m1 floating-point values (MXFP4) rather than offset integers.
    pub fn fp4(self) -> bool {
        self == Self::Mxfp4
    }

    /// Bytes of one expert (gate, up, down of `hidden x intermediate`) in this format.
    pub fn expert_bytes(self, hidden: usize, inter: usize) -> u64 {
        let weights = (3 * hidden * inter) as u64;
        match self.bits() {
            None => weights * u64::from(self.weight_bits()) / 8,
            Some(bits) => weights * u64::from(bits) / 8 + weights / QUANT_GROUP as u64 * 4,
        }
    }

    /// Quantised formats need both expert dimensions to be whole groups; bf16 pairs weights along
    /// both, so needs them even.
    pub fn check(self, hidden: usize, inter: usize) -> Result<(), OptionError> {
        if self == Self::Bf16 && (!hidden.is_multiple_of(2) || !inter.is_multiple_of(2)) {
            return Err(OptionError::new(
                "--expert-dtype",
                format!("bf16 needs even hidden ({hidden}) and expert intermediate ({inter}) sizes"),
            ));
        }
        if self.bits().is_some() && (!hidden.is_multiple_of(QUANT_GROUP) || !inter.is_multiple_of(QUANT_GROUP)) {
            return Err(OptionError::new(
                "--expert-dtype",
                format!(
                    "{self} needs hidden ({hidden}) and expert intermediate ({inter}) sizes divisible by {QUANT_GROUP}"
                ),
            ));
        }
        Ok(())
    }
}

/// How projection matrices (attention, dense and shared FFNs, routers, LM head) are stored on
/// the GPU (`--dense-dtype`): f32, or f16 (half the bytes, products summed in f32; an
/// approximation unless each value fits f16). Norms, biases and the KV cache stay f32.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "kebab-case")]
pub enum DenseDtype {
    #[default]
    F32,
    /// Needs `shader-f16`.
    F16,
    /// bfloat16 pairs (two per 32-bit word, widened by a shift in the kernels): exact for BF16
    /// checkpoints, needs no shader feature.
    Bf16,
}

impl DenseDtype {
    /// Bytes of one stored projection weight.
    pub fn bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// How the decode kernels (matrix-vector products, grouped experts) share one dot product among
/// units (`--decode-split`): `auto` splits on a GPU and keeps dot products whole on a CPU adapter;
/// a number is the most ways (a power of two up to 64; 1 keeps them whole). Sums change order
/// with the split, so logits differ by rounding between settings; offloaded and resident runs
/// of one setting stay bit-identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeSplit {
    #[default]
    Auto,
    Ways(u32),
}

impl FromStr for DecodeSplit {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, OptionError> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if n.is_power_of_two() && n <= 64 => Ok(Self::Ways(n)),
            _ => Err(OptionError::new("--decode-split", format!("{s:?} is not auto or a power of two from 1 to 64"))),
        }
    }
}

impl std::fmt::Display for DecodeSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Ways(n) => write!(f, "{n}"),
        }
    }
}

impl serde::Serialize for DecodeSplit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How a missed expert's bytes reach its GPU slot (`--upload`): through Ferry's own mapped
/// staging buffers (one host copy into a persistently allocated, host-visible buffer and one GPU
/// copy, submitted on its own), or through burn's `from_data` (wgpu's internal staging and a
/// fresh buffer per upload, inside burn's own submissions). `auto`: staging on a GPU, burn on a
/// CPU adapter, where lavapipe runs a submission on the submitting thread and the separate copy
/// made the compute thread wait for the queue (stall 45% against 22%). The bytes, and so the
/// results, are the same.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum UploadPath {
    #[default]
    Auto,
    Staging,
    Burn,
}

/// Where router logits become experts and weights (`--route-on`): `device`, a kernel whose result
/// stays on the GPU when every expert is resident (a decode step then reads the host twice, not
/// once per MoE layer) and is read back with the logits otherwise; `host`, read the logits back
/// and route on the CPU; `auto`: the device on a GPU, the host on a CPU adapter, where each
/// launch costs more than the read it saves. Weights differ between the two by float rounding;
/// offloaded and resident runs of one setting stay bit-identical.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Routing {
    #[default]
    Auto,
    Device,
    Host,
}

/// What happens to a routed expert that is not resident (`--miss-policy`): `upload` copies it
/// into a slot and the GPU computes it (exact: offloaded output equals all-resident output);
/// `cpu` computes it on the host from host memory while the GPU computes the resident ones
/// (approximate by float rounding only: another summation order), and uploads only into free
/// slots, so the first experts used take the slots and keep them (a placement, never an
/// eviction); `auto`
/// chooses per expert and step from measured costs: the link's seconds per byte against the
/// host kernel's, the tokens routed to the expert and the reuse it is expected to see.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum MissPolicy {
    #[default]
    Upload,
    Cpu,
    Auto,
}

/// Which resident expert gives up its slot when a miss needs one (`--expert-policy`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum EvictionPolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used (ties: least recently used).
    Lfu,
    /// The most used experts of each layer (from the prompt's routing or a saved profile) are
    /// pinned; the rest is LRU.
    LfuPinned,
    /// The expert unused for the most forward passes; among those last used in the same pass,
    /// the one whose layer comes round last. LRU's clock runs across layers, so in a layer
    /// sweep its victim is the next layer's expert from the previous token: the one needed
    /// soonest (after SpecMD's "Least-Stale").
    LeastStale,
    /// Frequency and recency: uses decayed by half per forward pass (LRFU); ties as least-stale.
    Lfru,
    /// Least-stale, but experts the predictor named for the layers still to run this pass go
    /// last (`--prefetch`, or the predictions a trace records).
    Lookahead,
    /// Experts the predictor named for the layers still to run this pass go last, as in
    /// `lookahead`; among the rest, the least used since the cache was made (counted while out
    /// of a slot too, unlike `lfu`), then the least recently used.
    LookaheadLfu,
}

/// Whether the next layer's experts are predicted and fetched ahead (`--prefetch`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "kebab-case")]
pub enum PrefetchMode {
    #[default]
    None,
    /// Pre-gating: layer N+1's router (or a trained pre-gate) applied to layer N's router input.
    /// Exact: the real routing still decides, and mispredicted experts are fetched on demand.
    Pregate,
    /// A predictor fitted on calibration text (`ferry predictor fit`, `predictor.safetensors` in
    /// the model folder) applied to layer N's router input. Exact in the same way.
    Learned,
}

/// Whether every token uses its full top-k (`--experts`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum ExpertsMode {
    /// Every token takes its full top-k (exact).
    #[default]
    Full,
    /// Unimportant tokens use half the top-k (MoBiLE; approximate).
    BigLittle,
}

/// How a token's importance is scored for big-little (`--importance`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Importance {
    /// Share of the top-k probability mass held by ranks k/2..k: what little mode would drop.
    #[default]
    DroppedMass,
    /// Entropy of the full router distribution: an unsure router marks an important token.
    Entropy,
    /// Attention the token receives in the same layer, relative to a uniform share
    /// (`graph::attention::received_attention`): tokens the sequence keeps reading are important.
    Attention,
}

/// What a big token does when an expert of its second half is not resident (`--big-fallback`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    strum::EnumString,
    strum::Display,
    strum::VariantNames,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum BigFallback {
    /// Fetch it (exact for big tokens).
    #[default]
    Fetch,
    /// Approximate: use the best-ranked resident expert not already chosen instead (or drop it
    /// when none is resident), and count the substitution.
    Substitute,
}

/// Big-little settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BigLittle {
    pub importance: Importance,
    /// Target share of big tokens (0..=1).
    pub big_fraction: f32,
    pub fallback: BigFallback,
}

impl BigLittle {
    /// `--experts` and its settings: None for full (exact) mode; the share must be in [0, 1].
    pub fn from_mode(
        mode: ExpertsMode,
        importance: Importance,
        big_fraction: f32,
        fallback: BigFallback,
    ) -> Result<Option<Self>, OptionError> {
        match mode {
            ExpertsMode::Full => Ok(None),
            ExpertsMode::BigLittle if !(0.0..=1.0).contains(&big_fraction) => {
                Err(OptionError::new("--big-fraction", format!("must be in [0, 1], got {big_fraction}")))
            }
            ExpertsMode::BigLittle => Ok(Some(Self { importance, big_fraction, fallback })),
        }
    }
}

/// A number of bytes as a user writes it: `1.5GiB`, `300MiB`, `512KiB`, `2GB`, `64MB`, plain
/// bytes, or `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a size, or explains (without naming a flag) what is wrong with it.
    fn parse(text: &str) -> Result<u64, &'static str> {
        let t = text.trim();
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let value: f64 = number.trim().parse().map_err(|_| "not a size")?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            _ => return Err("unknown unit"),
        };
        if !(value >= 0.0 && value.is_finite()) {
            return Err("must not be negative");
        }
        Ok((value * scale) as u64)
    }
}

impl FromStr for ByteSize {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, OptionError> {
        Self::parse(s)
            .map(Self)
            .map_err(|why| OptionError::new("size", format!("{s:?}: {why} (e.g. 64MiB, 1.5GiB or 0)")))
    }
}

/// A GPU memory budget as the user gives it (`--vram-budget`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum VramBudget {
    /// Everything resident: every expert has a slot.
    #[default]
    All,
    /// Total bytes for everything on the GPU (resident weights, KV cache, expert slots).
    Bytes(u64),
    /// A fraction (0..=1) of all routed experts' bytes, for expert slots alone.
    FractionOfExperts(f64),
}

impl FromStr for VramBudget {
    type Err = OptionError;

    /// Parses `all`, `25%`, `1.5GiB`, `300MiB`, `512KiB`, `2GB`, or plain bytes.
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let bad =
            |why: &str| OptionError::new("--vram-budget", format!("{s:?}: {why} (e.g. 1.5GiB, 300MiB, 25%, all)"));
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        if let Some(p) = t.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(bad("a percentage must be in [0, 100]; 0% keeps no expert on the GPU (--miss-policy cpu)"));
            }
            return Ok(if pct == 100.0 { Self::All } else { Self::FractionOfExperts(pct / 100.0) });
        }
        match ByteSize::parse(t) {
            Ok(0) => Err(bad("must be positive")),
            Ok(bytes) => Ok(Self::Bytes(bytes)),
            Err(why) => Err(bad(why)),
        }
    }
}

impl std::fmt::Display for VramBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Bytes(b) if b % (1 << 30) == 0 => write!(f, "{}GiB", b >> 30),
            Self::Bytes(b) if b % (1 << 20) == 0 => write!(f, "{}MiB", b >> 20),
            Self::Bytes(b) => write!(f, "{b}"),
            Self::FractionOfExperts(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// An emulated host-to-GPU link (`--link-gbps`): every upload takes at least its bytes over
/// this rate, so that a machine without a discrete GPU shows what one would see.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LinkModel {
    pub bytes_per_second: f64,
}

impl LinkModel {
    /// Gigabytes (1e9 bytes) per second.
    pub fn from_gb_per_s(gb: f64) -> Self {
        Self { bytes_per_second: gb * 1e9 }
    }

    /// `--link-gbps`: GB/s from 1e-6 (1 kB/s) to 1e6; beyond that range an upload would sleep
    /// for ages or not at all.
    pub fn checked(gbps: f64) -> Result<Self, OptionError> {
        if (1e-6..=1e6).contains(&gbps) {
            Ok(Self::from_gb_per_s(gbps))
        } else {
            Err(OptionError::new("--link-gbps", format!("must be a number of GB/s in [1e-6, 1e6], got {gbps}")))
        }
    }

    /// Sleeps for whatever part of the link time `bytes` still needs after `elapsed`.
    pub fn wait_out(&self, bytes: u64, elapsed: Duration) {
        // A rate built without `checked` may ask for more seconds than a Duration holds.
        let needed = Duration::try_from_secs_f64(bytes as f64 / self.bytes_per_second).unwrap_or(Duration::MAX);
        if let Some(rest) = needed.checked_sub(elapsed) {
            std::thread::sleep(rest);
        }
    }
}

/// Which adapter to use, as a user names it (`--adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterChoice {
    /// The best adapter wgpu finds (a discrete GPU before an integrated one before a CPU).
    #[default]
    Default,
    Discrete(usize),
    Integrated(usize),
    Virtual(usize),
    Cpu,
}

impl FromStr for AdapterChoice {
    type Err = OptionError;

    /// Parses `default`, `cpu`, `discrete[:N]`, `integrated[:N]`, `virtual[:N]`.
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => {
                let index = i
                    .parse::<usize>()
                    .map_err(|_| OptionError::new("--adapter", format!("{i:?} is not an adapter index")))?;
                (k, index)
            }
            None => (s, 0),
        };
        match kind {
            "default" => Ok(Self::Default),
            "discrete" => Ok(Self::Discrete(index)),
            "integrated" => Ok(Self::Integrated(index)),
            "virtual" => Ok(Self::Virtual(index)),
            "cpu" => Ok(Self::Cpu),
            other => Err(OptionError::new(
                "--adapter",
                format!("unknown adapter {other:?}; use default, cpu, discrete[:N], integrated[:N] or virtual[:N]"),
            )),
        }
    }
}

/// `--prefill-chunk`'s default: as llama.cpp's micro-batch, large enough that a prefill's expert
/// uploads serve many tokens, small enough that a chunk's activations stay far below a binding.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// How routed experts are kept on the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertOptions {
    pub budget: VramBudget,
    pub policy: EvictionPolicy,
    /// Tokens of KV cache counted against the budget (the model's context, at most 4096).
    pub kv_tokens: Option<usize>,
    pub prefetch: PrefetchMode,
    /// Experts predicted beyond top-k (`--prefetch-extra`).
    pub prefetch_extra: usize,
    /// The predictor's choice *is* the next MoE layer's routing (`--pregate-routing`): exact
    /// for a model trained that way (`ferry train --arch pregated-moe`), an approximation for
    /// any other.
    pub pregate_routing: bool,
    /// Emulated host-to-GPU link (`--link-gbps`), for measuring what a discrete GPU would see.
    pub link: Option<LinkModel>,
    /// Big-little experts (`--experts big-little`): an approximation, off by default.
    pub big_little: Option<BigLittle>,
    /// Largest GPU buffer of expert slots and of LM-head blocks, in bytes (None: what the adapter
    /// can bind). Smaller pages spread a layer's experts over more kernel launches and the head
    /// over more blocks; set when the model is loaded.
    pub page_bytes: Option<u64>,
    /// Most tokens one forward pass runs (`--prefill-chunk`): a longer prompt runs as several
    /// passes over the growing cache, so its activations and its attention stay within a size
    /// that does not depend on its length.
    pub prefill_chunk: usize,
    /// How routed experts are stored in host RAM and GPU slots (`--expert-dtype`); quantised
    /// formats are approximations. Set when the model is loaded.
    pub expert_dtype: ExpertDtype,
    /// How projection matrices are stored on the GPU (`--dense-dtype`); f16 is an
    /// approximation. Set when the model is loaded.
    pub dense_dtype: DenseDtype,
    /// How decode kernels split their dot products (`--decode-split`). Set when the model is
    /// loaded.
    pub decode_split: DecodeSplit,
    /// How missed experts are uploaded (`--upload`).
    pub upload: UploadPath,
    /// Where routing runs (`--route-on`).
    pub routing: Routing,
    /// Whether a missed expert is uploaded or computed on the host (`--miss-policy`).
    pub miss_policy: MissPolicy,
    /// Threads of the host expert kernel (`--cpu-threads`; None: every core).
    pub cpu_threads: Option<usize>,
}

impl Default for ExpertOptions {
    fn default() -> Self {
        Self {
            budget: VramBudget::All,
            policy: EvictionPolicy::Lru,
            kv_tokens: None,
            prefetch: PrefetchMode::None,
            prefetch_extra: 0,
            pregate_routing: false,
            link: None,
            big_little: None,
            page_bytes: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            expert_dtype: ExpertDtype::F32,
            dense_dtype: DenseDtype::F32,
            decode_split: DecodeSplit::Auto,
            upload: UploadPath::Auto,
            routing: Routing::Auto,
            miss_policy: MissPolicy::Upload,
            cpu_threads: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_parse_and_display_from_one_list() {
        for &name in ExpertDtype::VARIANTS {
            assert_eq!(name.parse::<ExpertDtype>().unwrap().to_string(), name);
        }
        assert_eq!(ExpertDtype::VARIANTS, ["f32", "f16", "bf16", "int8", "int4", "int3", "int2", "mxfp4"]);
        assert_eq!(
            EvictionPolicy::VARIANTS,
            ["lru", "lfu", "lfu-pinned", "least-stale", "lfru", "lookahead", "lookahead-lfu"]
        );
        assert_eq!("lfu-pinned".parse::<EvictionPolicy>().unwrap(), EvictionPolicy::LfuPinned);
        assert_eq!(Importance::DroppedMass.to_string(), "dropped-mass");
        let err = parse_choice::<PrefetchMode>("--prefetch", "always").unwrap_err().to_string();
        assert_eq!(err, "--prefetch: unknown value \"always\"; use none, pregate, learned");
    }

    #[test]
    fn budgets_and_sizes_parse_units_and_reject_nonsense() {
        assert_eq!("all".parse::<VramBudget>().unwrap(), VramBudget::All);
        assert_eq!("100%".parse::<VramBudget>().unwrap(), VramBudget::All);
        assert_eq!("25%".parse::<VramBudget>().unwrap(), VramBudget::FractionOfExperts(0.25));
        assert_eq!("1.5GiB".parse::<VramBudget>().unwrap(), VramBudget::Bytes(3 << 29));
        assert_eq!("300MB".parse::<VramBudget>().unwrap(), VramBudget::Bytes(300_000_000));
        assert_eq!("0%".parse::<VramBudget>().unwrap(), VramBudget::FractionOfExperts(0.0));
        for bad in ["0", "-1GiB", "-5%", "120%", "12 parsecs", "lots"] {
            let err = bad.parse::<VramBudget>().unwrap_err().to_string();
            assert!(err.starts_with("--vram-budget:"), "{bad}: {err}");
        }
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!("0".parse::<ByteSize>().unwrap(), ByteSize(0));
        assert!("-5".parse::<ByteSize>().is_err());
    }

    #[test]
    fn adapter_choices_parse_and_bad_ones_name_the_flag() {
        assert_eq!("default".parse::<AdapterChoice>().unwrap(), AdapterChoice::Default);
        assert_eq!("discrete:1".parse::<AdapterChoice>().unwrap(), AdapterChoice::Discrete(1));
        assert_eq!("cpu".parse::<AdapterChoice>().unwrap(), AdapterChoice::Cpu);
        let err = "gpu".parse::<AdapterChoice>().unwrap_err().to_string();
        assert!(err.contains("--adapter"), "{err}");
        assert!("discrete:x".parse::<AdapterChoice>().is_err());
    }

    #[test]
    fn links_must_be_positive_and_finite() {
        assert_eq!(LinkModel::checked(16.0).unwrap().bytes_per_second, 16e9);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30, 1e30] {
            assert!(LinkModel::checked(bad).unwrap_err().to_string().starts_with("--link-gbps"));
        }
    }

    /// A rate so slow that its link time overflows a Duration waits as long as one can hold
    /// (here: nothing is left after `Duration::MAX` elapsed) instead of panicking.
    #[test]
    fn a_link_time_beyond_a_duration_does_not_panic() {
        LinkModel { bytes_per_second: 1e-30 }.wait_out(1 << 40, Duration::MAX);
    }

    #[test]
    fn expert_sizes_count_codes_and_scales_and_bad_shapes_name_the_flag() {
        assert_eq!(ExpertDtype::F32.expert_bytes(64, 32), 3 * 64 * 32 * 4);
        assert_eq!(ExpertDtype::Int8.expert_bytes(64, 32), 3 * 64 * 32 + 3 * 64 * 32 / 32 * 4);
        assert_eq!(ExpertDtype::Int4.expert_bytes(64, 32), 3 * 64 * 32 / 2 + 3 * 64 * 32 / 32 * 4);
        assert_eq!(ExpertDtype::Int3.expert_bytes(64, 32), 3 * 64 * 32 * 3 / 8 + 3 * 64 * 32 / 32 * 4);
        let err = ExpertDtype::Int8.check(48, 40).unwrap_err().to_string();
        assert!(err.contains("--expert-dtype"), "{err}");
        assert!(ExpertDtype::F32.check(48, 40).is_ok());
        assert_eq!(ExpertDtype::Bf16.expert_bytes(64, 32), 3 * 64 * 32 * 2);
        assert!(ExpertDtype::Bf16.check(48, 40).is_ok());
        assert!(ExpertDtype::Bf16.check(48, 41).unwrap_err().to_string().contains("even"));
    }
}
