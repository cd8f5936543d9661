//! `ferry info`: what a model is and how its bytes split between resident weights and experts.

use anyhow::Result;
use ferry_runtime::options::{ExpertOptions, VramBudget};
use ferry_runtime::spec::{ExpertLayout, FfnKind, ModelSpec};

use crate::args::InfoArgs;
use crate::load;

pub fn run(args: InfoArgs) -> Result<()> {
    let folder = load::model_folder(&args.model)?;
    let opened = ferry_models::open(&folder)?;
    let spec = &opened.spec;
    let moe_layers = spec.layers.iter().filter(|f| matches!(f, FfnKind::Moe)).count();
    let resident = spec.resident_params();
    let experts = spec.expert_params_total();
    let a = &spec.attention;
    // KV cache bytes per token over all layers, in the f32 the graph keeps it in.
    let kv_bytes = spec.num_layers() * a.kv_elements_per_token() * 4;
    let kv_expanded = spec.num_layers() * a.kv_elements_per_token_expanded() * 4;
    let sliding = (0..spec.num_layers()).filter(|&l| a.window(l).is_some()).count();
    let mut extra = String::new();
    if a.sinks {
        extra.push_str(", attention sinks");
    }
    if let Some(w) = a.sliding_window.filter(|_| sliding > 0) {
        extra.push_str(&format!(", sliding window {w} on {sliding} of {} layers", spec.num_layers()));
    }
    let attention = match &a.mla {
        None => format!("{} heads, {} KV heads, head_dim {}{extra}", a.num_heads, a.num_kv_heads, a.head_dim),
        Some(m) => format!(
            "MLA: {} heads, kv_lora_rank {}, q_lora_rank {}, qk {}+{} (nope+rope), v {}",
            a.num_heads,
            m.kv_lora_rank,
            m.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
    };
    let expert_format = expert_format(&opened);
    // What the flags (auto by default) run the model in: the stored width of experts and
    // projections on the GPU.
    let options = load::expert_options(&args.model)?;
    let expert_bytes_each = options.expert_dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
    let projections = spec.projection_params() as u64;
    let gpu_resident =
        projections * options.dense_dtype.bytes() + (spec.gpu_resident_params() as u64 - projections) * 4;
    let longest_context = longest_context(spec, &options, gpu_resident);
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
        // On the GPU: an untied embedding stays in the checkpoint, read a row per token.
        "gpu_resident_bytes_f32": spec.gpu_resident_params() * 4,
        // What --dense-dtype f16 stores at two bytes instead of four.
        "projection_parameters": spec.projection_params(),
        "expert_bytes_f32": experts * 4,
        "checkpoint_bytes": opened.weights.total_bytes(),
        "kv_bytes_per_token_f32": kv_bytes,
        "kv_bytes_per_token_f32_expanded": kv_expanded,
        // Under a --vram-budget in bytes: the longest context whose KV cache fits next to the
        // resident weights and one layer's top-k expert slots (null for other budgets).
        "longest_context_at_budget": longest_context,
        "expert_format": expert_format,
        "expert_dtype": options.expert_dtype,
        "dense_dtype": options.dense_dtype,
        "expert_bytes_each": expert_bytes_each,
        "gpu_resident_bytes": gpu_resident,
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
    println!("attention     {attention}");
    if a.mla.is_some() {
        println!(
            "KV cache      {} B/token (f32, latent + rope key; {} B expanded per head, {:.1}x saved)",
            kv_bytes,
            kv_expanded,
            kv_expanded as f64 / kv_bytes.max(1) as f64
        );
    } else if sliding > 0 {
        println!("KV cache      {kv_bytes} B/token (f32; sliding layers keep at most their window)");
    } else {
        println!("KV cache      {kv_bytes} B/token (f32)");
    }
    if let Some(tokens) = longest_context {
        println!(
            "at budget     KV cache for {tokens} tokens at most (next to the resident weights and top-{} slots)",
            spec.moe.top_k
        );
    }
    println!("router        {:?}", spec.moe.router);
    println!("experts on disk  {expert_format}");
    println!("context       {} tokens", spec.max_position_embeddings);
    println!("parameters    {} ({} resident, {} in routed experts)", resident + experts, resident, experts);
    println!(
        "bytes (f32)   {:.2} MiB resident, {:.2} MiB experts ({:.3} MiB each)",
        mib(resident * 4),
        mib(experts * 4),
        mib(spec.expert_params() * 4)
    );
    println!(
        "runs as       experts {} ({:.3} MiB each), projections {} ({:.2} MiB on the GPU with norms)",
        options.expert_dtype,
        expert_bytes_each as f64 / (1024.0 * 1024.0),
        options.dense_dtype,
        gpu_resident as f64 / (1024.0 * 1024.0)
    );
    println!("checkpoint    {:.2} MiB on disk", mib(opened.weights.total_bytes()));
    Ok(())
}

/// The longest context (at most the model's) whose f32 KV cache fits a `--vram-budget` in
/// bytes next to the resident weights and the fewest expert slots that work (one layer's top-k);
/// None for a budget that is not in bytes, Some(0) when not even those fit.
fn longest_context(spec: &ModelSpec, options: &ExpertOptions, gpu_resident: u64) -> Option<usize> {
    let VramBudget::Bytes(budget) = options.budget else { return None };
    let slots = spec.moe.top_k.min(spec.moe.num_experts) as u64;
    let slot_bytes = options.expert_dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
    let room = budget.saturating_sub(gpu_resident + slots * slot_bytes);
    let fits = |tokens: usize| spec.attention.kv_elements(spec.num_layers(), tokens) as u64 * 4 <= room;
    // kv_elements grows with tokens (windowed layers stop growing): the last that fits.
    let (mut lo, mut hi) = (0, spec.max_position_embeddings);
    if fits(hi) {
        return Some(hi);
    }
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) { lo = mid } else { hi = mid }
    }
    Some(lo)
}

/// How the first MoE layer's routed experts are stored in the checkpoint (`BF16`, `MXFP4`, ...),
/// or "none".
fn expert_format(opened: &ferry_models::ModelFolder) -> String {
    let spec = &opened.spec;
    let Some(layer) = spec.layers.iter().position(|f| matches!(f, FfnKind::Moe)) else {
        return "none".into();
    };
    let fused = spec.names.layer(layer, &spec.names.fused_experts);
    let (name, label) = match spec.moe.layout {
        ExpertLayout::PerExpert => (spec.names.expert_weights(layer, 0)[0].clone(), ""),
        ExpertLayout::Fused => (format!("{fused}.gate_up_proj"), " (fused gate/up)"),
        ExpertLayout::Mxfp4 => return "MXFP4 (e2m1 blocks, power-of-two scale per 32)".into(),
        ExpertLayout::Prequantised(dtype) => return format!("{dtype} (ferry convert quantize, slot layout)"),
    };
    match opened.weights.tensor(&name) {
        Some(t) => format!("{:?}{label}", t.dtype),
        None => "missing".into(),
    }
}
