//! From command-line model arguments to a ready engine.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferry_runtime::Gpu;
use ferry_runtime::chat::ChatTokenizer;
use ferry_runtime::engine::Engine;
use ferry_runtime::experts::stored_expert_dtype;
use ferry_runtime::graph::{Model, stored_dense_dtype};
use ferry_runtime::options::{AdapterChoice, BigLittle, DenseDtype, ExpertDtype, ExpertOptions, LinkModel};

use crate::args::{BigLittleArgs, DenseDtypeChoice, ExpertDtypeChoice, ModelArgs};

/// The model folder the user named (a folder, or a hub name `ORG/NAME[@REVISION]` found in the
/// local HuggingFace cache), or the built-in default (generated on first use).
pub fn model_folder(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(folder) => Ok(ferry_models::hub::resolve(folder)?),
        None => Ok(ferry_models::random_model::ensure()?),
    }
}

pub struct Loaded {
    pub engine: Engine,
    pub gpu: Gpu,
}

/// Opens the folder, the GPU and the tokenizer (if the folder has one) and uploads the weights.
pub fn engine(args: &ModelArgs, need_tokenizer: bool) -> Result<Loaded> {
    let folder = model_folder(args)?;
    let source = Source {
        folder: folder.clone(),
        adapter: args.adapter,
        options: expert_options(args)?,
        lut_cache: args.lut_cache.0,
    };
    let bar = terminal_bar();
    let mut loaded = engine_from(&source, need_tokenizer, |stage| {
        if let (Some(bar), Stage::Bytes { read, total }) = (&bar, stage) {
            bar.set_length(total);
            bar.set_position(read.min(total));
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &args.expert_profile {
        let text = std::fs::read_to_string(path).with_context(|| format!("--expert-profile {}", path.display()))?;
        let profile: ExpertProfile = serde_json::from_str(&text)
            .with_context(|| format!("--expert-profile {}: not a Ferry profile", path.display()))?;
        loaded.engine.model.experts_mut().pin_most_used(&profile.usage);
    }
    Ok(loaded)
}

/// Where a model comes from and how it is set up on the GPU.
#[derive(Debug, Clone)]
pub struct Source {
    pub folder: PathBuf,
    /// `--adapter`.
    pub adapter: AdapterChoice,
    pub options: ExpertOptions,
    /// `--lut-cache` in bytes.
    pub lut_cache: u64,
}

/// What loading is doing, for progress displays.
#[derive(Debug, Clone, Copy)]
pub enum Stage<'a> {
    Step(&'a str),
    /// Uploading: checkpoint bytes read (mapped, checked, converted) of the checkpoint's total;
    /// offloaded experts are read later, so a budget ends the load before `total`.
    Bytes {
        read: u64,
        total: u64,
    },
}

impl std::fmt::Display for Stage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Step(step) => f.write_str(step),
            Stage::Bytes { read, total } => {
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                write!(f, "uploading weights: {:.1} of {:.1} MiB read and checked", mib(*read), mib(*total))
            }
        }
    }
}

/// A bytes bar on stderr when it is a terminal (nothing in pipes, logs and tests).
fn terminal_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Loads `source`, telling `stage` what it is doing (for progress displays; called from a
/// second thread while the weights upload).
pub fn engine_from(source: &Source, need_tokenizer: bool, stage: impl Fn(Stage) + Sync) -> Result<Loaded> {
    let folder = &source.folder;
    stage(Stage::Step("reading config.json and mapping the safetensors"));
    let opened = ferry_models::open(folder)?;
    stage(Stage::Step("opening the GPU"));
    let gpu = Gpu::open(source.adapter)?;
    let tokenizer = if need_tokenizer || folder.join("tokenizer.json").exists() {
        stage(Stage::Step("reading the tokenizer"));
        Some(ChatTokenizer::open(folder)?)
    } else {
        None
    };
    if let Some(warning) =
        tokenizer.as_ref().and_then(|t| vocab_mismatch(folder, t.vocab_size(), opened.spec.vocab_size))
    {
        eprintln!("warning: {warning}");
    }
    let weights = &opened.weights;
    let total = weights.total_bytes() as u64;
    let start = weights.bytes_read();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let stage = &stage;
    let loaded = std::thread::scope(|scope| {
        // Reports the bytes read every 200 ms while the upload runs on this thread; dropping
        // `done` wakes it at once, so a load does not wait out a tick.
        scope.spawn(move || {
            let tick = std::time::Duration::from_millis(200);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(tick) {
                stage(Stage::Bytes { read: weights.bytes_read() - start, total });
            }
        });
        let loaded = Model::load_with(opened.spec, weights, &gpu.device, source.options);
        drop(done);
        loaded
    });
    let mut model = loaded.with_context(|| format!("loading {}", folder.display()))?;
    model.set_lookup_cache(source.lut_cache);
    Ok(Loaded { engine: Engine::new(model, tokenizer), gpu })
}

/// A tokenizer with less than half the model's vocabulary is most likely another model's: the
/// model then samples ids that decode to nothing. Reported, not refused (random checkpoints
/// with real vocabulary sizes pair them with the small built-in tokenizer on purpose).
fn vocab_mismatch(folder: &Path, tokenizer: usize, model: usize) -> Option<String> {
    (tokenizer.saturating_mul(2) < model).then(|| {
        format!(
            "{}: the tokenizer has {tokenizer} tokens but config.json's vocab_size is {model}; ids beyond the \
             tokenizer's print as nothing (is it this model's tokenizer?)",
            folder.join("tokenizer.json").display()
        )
    })
}

/// The expert flags as the runtime takes them. `auto` formats read the checkpoint's own widths
/// from the folder, opened once for both.
pub fn expert_options(args: &ModelArgs) -> Result<ExpertOptions> {
    let auto = args.expert_dtype == ExpertDtypeChoice::Auto || args.dense_dtype == DenseDtypeChoice::Auto;
    let opened = if auto { Some(ferry_models::open(&model_folder(args)?)?) } else { None };
    let expert_dtype = match (args.expert_dtype, &opened) {
        (ExpertDtypeChoice::Fixed(dtype), _) => dtype,
        (ExpertDtypeChoice::Auto, Some(o)) => stored_expert_dtype(&o.weights, &o.spec)?.unwrap_or_default(),
        (ExpertDtypeChoice::Auto, None) => ExpertDtype::default(),
    };
    let dense_dtype = match (args.dense_dtype, &opened) {
        (DenseDtypeChoice::Fixed(dtype), _) => dtype,
        (DenseDtypeChoice::Auto, Some(o)) => stored_dense_dtype(&o.weights, &o.spec),
        (DenseDtypeChoice::Auto, None) => DenseDtype::default(),
    };
    Ok(ExpertOptions {
        budget: args.vram_budget,
        policy: args.expert_policy,
        kv_tokens: args.max_context,
        prefetch: args.prefetch,
        prefetch_extra: args.prefetch_extra,
        pregate_routing: args.pregate_routing,
        link: link(args.link_gbps)?,
        big_little: big_little(&args.big_little)?,
        page_bytes: None,
        prefill_chunk: args.prefill_chunk,
        expert_dtype,
        dense_dtype,
        decode_split: args.decode_split,
        upload: args.upload,
        routing: args.route_on,
        miss_policy: args.miss_policy,
        cpu_threads: args.cpu_threads,
    })
}

/// `--expert-dtype` for `folder`: `auto` keeps experts at the width the folder stores them in
/// (BF16, MXFP4, or what `ferry convert quantize` wrote) and runs F32 and F16 experts in f32.
pub fn resolve_expert_dtype(choice: ExpertDtypeChoice, folder: &Path) -> Result<ExpertDtype> {
    if let ExpertDtypeChoice::Fixed(dtype) = choice {
        return Ok(dtype);
    }
    let opened = ferry_models::open(folder)?;
    Ok(stored_expert_dtype(&opened.weights, &opened.spec)?.unwrap_or_default())
}

/// `--experts` and its settings; None for full (exact) mode.
pub fn big_little(args: &BigLittleArgs) -> Result<Option<BigLittle>> {
    Ok(BigLittle::from_mode(args.experts, args.importance, args.big_fraction, args.big_fallback)?)
}

/// `--link-gbps` as a link model.
pub fn link(gbps: Option<f64>) -> Result<Option<LinkModel>> {
    Ok(gbps.map(LinkModel::checked).transpose()?)
}

/// How often each expert was used, `usage[layer][expert]`; written by --save-expert-profile.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpertProfile {
    pub usage: Vec<Vec<u64>>,
}
