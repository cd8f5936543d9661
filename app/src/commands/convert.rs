//! `ferry convert mole-to-lut`: re-parameterises a MoLE checkpoint's lookup experts into the
//! lookup table and writes a complete model folder that runs from it.

use anyhow::{Context, Result};
use ferry_runtime::graph::write_lookup_table;
use ferry_runtime::lut::{LUT_FILE, LutDtype};
use ferry_runtime::{AdapterChoice, Gpu};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ConvertCommand, MoleToLutArgs};

/// Files copied unchanged from the source folder when present.
const COPIED: &[&str] = &["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"];

pub fn run(command: ConvertCommand) -> Result<()> {
    match command {
        ConvertCommand::MoleToLut(args) => mole_to_lut(args),
    }
}

fn mole_to_lut(args: MoleToLutArgs) -> Result<()> {
    let opened = ferry_models::open(&args.model)?;
    if opened.spec.mole.is_none() {
        anyhow::bail!(
            "--model {}: architecture {} is not a MoLE model ({})",
            args.model.display(),
            opened.spec.architecture,
            ferry_models::mole::ARCHITECTURE
        );
    }
    if opened.weights.folder().join(LUT_FILE).exists()
        && !opened.weights.contains("model.layers.0.mlp.expert_norm.weight")
    {
        anyhow::bail!("--model {}: already converted (it has {LUT_FILE} and no expert FFNs)", args.model.display());
    }
    if args.out.join("config.json").exists() {
        anyhow::bail!("--out {}: a model is already there", args.out.display());
    }
    let dtype: LutDtype = args.dtype.parse()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let gpu = Gpu::open(args.adapter.parse::<AdapterChoice>()?)?;

    let bar = ProgressBar::new(opened.spec.vocab_size as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tokens ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("evaluating lookup experts");
    let lut_path = args.out.join(LUT_FILE);
    let header = write_lookup_table(&opened.spec, &opened.weights, &gpu.device, &lut_path, dtype, |done, _| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("writing {}", lut_path.display()))?;
    bar.finish_and_clear();

    for name in COPIED {
        let from = args.model.join(name);
        if from.exists() {
            std::fs::copy(&from, args.out.join(name)).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let weights_path = args.out.join("model.safetensors");
    let kept = ferry_models::mole::write_without_lookup_experts(&opened.weights, &weights_path)
        .with_context(|| format!("writing {}", weights_path.display()))?;
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "wrote {}: {LUT_FILE} {:.2} MiB ({} tokens x {} layers x {} experts x {} values, {:?}; {} bytes per token row), model.safetensors {:.2} MiB without the expert FFNs",
        args.out.display(),
        mib(header.file_bytes()),
        header.vocab,
        header.layers,
        header.experts,
        header.d_model,
        header.dtype,
        header.row_bytes(),
        mib(kept as u64)
    );
    Ok(())
}
