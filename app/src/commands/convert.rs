//! `ferry convert mole-to-lut`: re-parameterises a MoLE checkpoint's lookup experts into the
//! lookup table and writes a complete model folder that runs from it.

use anyhow::{Context, Result};
use ferry_runtime::Gpu;
use ferry_runtime::lut::LUT_FILE;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ConvertCommand, MoleToLutArgs, QuantizeArgs};

pub fn run(command: ConvertCommand) -> Result<()> {
    match command {
        ConvertCommand::MoleToLut(args) => mole_to_lut(args),
        ConvertCommand::Quantize(args) => quantize(args),
    }
}

fn quantize(mut args: QuantizeArgs) -> Result<()> {
    args.model = ferry_models::hub::resolve(&args.model)?;
    let dtype = args.dtype;
    if dtype.bits().is_none() {
        anyhow::bail!("--dtype {dtype}: use a quantised format (int8, int4, int3, int2 or mxfp4)");
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} experts ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("quantising to {dtype}"));
    let done = ferry_models::quantize::quantize_folder(&args.model, &args.out, dtype, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("quantising {} into {}", args.model.display(), args.out.display()))?;
    bar.finish_and_clear();
    let mib = |b: usize| b as f64 / 1048576.0;
    eprintln!(
        "wrote {}: {} experts as {dtype}, {:.2} MiB of experts (from {:.2} MiB), model.safetensors {:.2} MiB",
        args.out.display(),
        done.experts,
        mib(done.output_expert_bytes),
        mib(done.source_expert_bytes),
        mib(done.output_bytes)
    );
    Ok(())
}

fn mole_to_lut(mut args: MoleToLutArgs) -> Result<()> {
    args.model = ferry_models::hub::resolve(&args.model)?;
    let dtype = args.dtype;
    let gpu = Gpu::open(args.adapter)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tokens ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("evaluating lookup experts");
    let converted = ferry_models::mole::convert_to_lut(&args.model, &args.out, &gpu, dtype, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("converting {} into {}", args.model.display(), args.out.display()))?;
    bar.finish_and_clear();
    let header = converted.table;
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
        mib(converted.kept_weight_bytes as u64)
    );
    Ok(())
}
