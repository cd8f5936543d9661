//! `ferry info`: what a model is and how its bytes split between resident weights and experts.

use anyhow::Result;
use ferry_runtime::spec::FfnKind;

use crate::args::InfoArgs;
use crate::load;

pub fn run(args: InfoArgs) -> Result<()> {
    let folder = load::model_folder(&args.model)?;
    let opened = ferry_models::open(&folder)?;
    let spec = &opened.spec;
    let moe_layers = spec.layers.iter().filter(|f| matches!(f, FfnKind::Moe)).count();
    let resident = spec.resident_params();
    let experts = spec.expert_params_total();
    // The graph computes in f32: 4 bytes per parameter on the GPU.
    let value = serde_json::json!({
        "folder": folder,
        "family": spec.family,
        "architecture": spec.architecture,
        "layers": spec.num_layers(),
        "moe_layers": moe_layers,
        "experts_per_layer": spec.moe.num_experts,
        "top_k": spec.moe.top_k,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "context": spec.max_position_embeddings,
        "parameters": resident + experts,
        "resident_parameters": resident,
        "expert_parameters": experts,
        "expert_bytes_each_f32": spec.expert_params() * 4,
        "resident_bytes_f32": resident * 4,
        "expert_bytes_f32": experts * 4,
        "checkpoint_bytes": opened.weights.total_bytes(),
        "spec": spec,
    });
    if args.json {
        println!("{value}");
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!("folder        {}", folder.display());
    println!("family        {} ({})", spec.family, spec.architecture);
    println!("layers        {} ({} MoE)", spec.num_layers(), moe_layers);
    println!("experts       {} per layer, top-{}", spec.moe.num_experts, spec.moe.top_k);
    println!("hidden/vocab  {} / {}", spec.hidden_size, spec.vocab_size);
    println!("context       {} tokens", spec.max_position_embeddings);
    println!("parameters    {} ({} resident, {} in routed experts)", resident + experts, resident, experts);
    println!(
        "bytes (f32)   {:.2} MiB resident, {:.2} MiB experts ({:.3} MiB each)",
        mib(resident * 4),
        mib(experts * 4),
        mib(spec.expert_params() * 4)
    );
    println!("checkpoint    {:.2} MiB on disk", mib(opened.weights.total_bytes()));
    Ok(())
}
