//! `ferry convert quantize`: writes a copy of a model folder whose routed experts are stored
//! quantised, in the layout of Ferry's GPU slots, so that loading maps and uploads them without
//! quantising anything (and host RAM holds the quantised bytes, not f32).
//!
//! The output keeps every other tensor as it was (names, dtypes, bytes; GPT-OSS's expert biases
//! included) and adds, per MoE layer, `ferry_experts.{gate,up,down}.codes` / `.scales`
//! (`ExpertLayout::Prequantised`). config.json gains `ferry_expert_quantization`, which the
//! loader reads; transformers cannot load the result.

use std::path::Path;
use std::sync::Arc;

use ferry_runtime::error::{FerryError, Result};
use ferry_runtime::experts::{ExpertStore, QUANT_GROUP, code_rows, prequantised_names};
use ferry_runtime::options::ExpertDtype;
use ferry_runtime::spec::{ExpertLayout, FfnKind, ModelSpec};
use safetensors::tensor::TensorView;
use serde_json::Value;

use crate::config::HfConfig;

/// The config.json key that marks a folder written by `convert quantize`.
pub const CONFIG_KEY: &str = "ferry_expert_quantization";

/// Files copied unchanged from the source folder when present (config.json is rewritten).
const COPIED: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The format a converted folder stores its experts in, if it is one.
pub fn stored_dtype(cfg: &HfConfig) -> Result<Option<ExpertDtype>> {
    let Some(entry) = cfg.get(CONFIG_KEY) else { return Ok(None) };
    let dtype = entry.get("dtype").and_then(Value::as_str).ok_or_else(|| {
        FerryError::config(&cfg.path, format!("{CONFIG_KEY} needs a \"dtype\" (int8, int4, int3, int2 or mxfp4)"))
    })?;
    let dtype: ExpertDtype = dtype.parse().map_err(|e| FerryError::config(&cfg.path, format!("{CONFIG_KEY}: {e}")))?;
    if dtype.bits().is_none() {
        return Err(FerryError::config(&cfg.path, format!("{CONFIG_KEY}: {dtype} is not a quantised format")));
    }
    let group = entry.get("group_size").and_then(Value::as_u64);
    if group != Some(QUANT_GROUP as u64) {
        return Err(FerryError::config(
            &cfg.path,
            format!("{CONFIG_KEY}: group_size {group:?} is not Ferry's {QUANT_GROUP}"),
        ));
    }
    Ok(Some(dtype))
}

/// What `quantize_folder` wrote.
#[derive(Debug, Clone, Copy)]
pub struct Quantised {
    pub experts: usize,
    /// Bytes of expert tensors in the source and in the output.
    pub source_expert_bytes: usize,
    pub output_expert_bytes: usize,
    /// Bytes of all tensor data in the output's model.safetensors.
    pub output_bytes: usize,
}

/// Quantises the routed experts of the model in `model` to `dtype` and writes a complete folder
/// into `out` (created; must not already hold a model). `on_progress(done, total)` counts
/// experts.
pub fn quantize_folder(
    model: &Path,
    out: &Path,
    dtype: ExpertDtype,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<Quantised> {
    if dtype.bits().is_none() {
        return Err(FerryError::flag(
            "--dtype",
            format!("{dtype} is not a quantised format; use int8, int4, int3, int2 or mxfp4"),
        ));
    }
    let opened = crate::open(model)?;
    let spec = &opened.spec;
    if let ExpertLayout::Prequantised(stored) = spec.moe.layout {
        return Err(FerryError::config(
            model.join("config.json"),
            format!("the experts are already quantised ({stored}); convert the original model"),
        ));
    }
    let moe_layers: Vec<usize> = (0..spec.num_layers()).filter(|&l| spec.layers[l] == FfnKind::Moe).collect();
    if moe_layers.is_empty() {
        return Err(FerryError::config(model.join("config.json"), "the model has no routed experts to quantise"));
    }
    if out.join("config.json").exists() {
        return Err(FerryError::io(out, "already holds a model (config.json); choose an empty folder"));
    }
    std::fs::create_dir_all(out).map_err(|e| FerryError::io(out, e))?;
    let store = ExpertStore::new(Arc::clone(&opened.weights), spec, dtype)?;

    // Codes and scales per layer and projection, experts concatenated: [experts, rows, n].
    let total = moe_layers.len() * spec.moe.num_experts;
    let (h, i) = (spec.hidden_size, spec.moe.expert_intermediate_size);
    let bits = dtype.bits().unwrap_or(32);
    let mut new_tensors: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
    let mut source_expert_bytes = 0;
    let mut done = 0;
    for &layer in &moe_layers {
        let mut parts: [(Vec<u8>, Vec<u8>); 3] = Default::default();
        for expert in 0..spec.moe.num_experts {
            source_expert_bytes += store.source_bytes(layer, expert);
            let q = store.quantised(layer, expert);
            for (part, m) in parts.iter_mut().zip([&q.gate, &q.up, &q.down]) {
                part.0.extend(m.words.iter().flat_map(|w| w.to_le_bytes()));
                part.1.extend(m.scales.iter().flat_map(|s| s.to_le_bytes()));
            }
            done += 1;
            on_progress(done, total);
        }
        let e = spec.moe.num_experts;
        for ((codes, scales), (name, (k, n))) in
            parts.into_iter().zip([("gate", (h, i)), ("up", (h, i)), ("down", (i, h))])
        {
            let [codes_name, scales_name] = prequantised_names(name).map(|n| spec.names.layer(layer, &n));
            new_tensors.push((codes_name, vec![e, code_rows(k, bits), n], codes, safetensors::Dtype::U32));
            new_tensors.push((scales_name, vec![e, k / QUANT_GROUP, n], scales, safetensors::Dtype::F32));
        }
    }

    let replaced = expert_tensor_names(spec, &moe_layers);
    let weights = &opened.weights;
    let mut views: Vec<(String, TensorView)> = Vec::new();
    let mut output_bytes = 0;
    for name in weights.names().into_iter().filter(|n| !replaced.contains(*n)) {
        let Some(tensor) = weights.tensor(name) else { continue };
        let bytes = weights.bytes(tensor);
        output_bytes += bytes.len();
        let view = TensorView::new(tensor.dtype.to_safetensors(), tensor.shape.clone(), bytes)
            .map_err(|e| FerryError::io(out, e))?;
        views.push((name.to_string(), view));
    }
    let mut output_expert_bytes = 0;
    for (name, shape, bytes, st_dtype) in &new_tensors {
        output_expert_bytes += bytes.len();
        let view = TensorView::new(*st_dtype, shape.clone(), bytes).map_err(|e| FerryError::io(out, e))?;
        views.push((name.clone(), view));
    }
    output_bytes += output_expert_bytes;
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| FerryError::io(&path, e))?;

    write_config(model, out, spec, dtype)?;
    for file in COPIED {
        let from = model.join(file);
        if from.exists() {
            std::fs::copy(&from, out.join(file)).map_err(|e| FerryError::io(&from, e))?;
        }
    }
    Ok(Quantised { experts: total, source_expert_bytes, output_expert_bytes, output_bytes })
}

/// The source's config.json plus the quantisation entry; an MXFP4 `quantization_config` is
/// dropped, since the experts are no longer in its blocks.
fn write_config(model: &Path, out: &Path, spec: &ModelSpec, dtype: ExpertDtype) -> Result<()> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| FerryError::io(&path, e))?;
    let mut config: Value =
        serde_json::from_str(&text).map_err(|e| FerryError::Json { path: path.clone(), message: e.to_string() })?;
    if let Some(object) = config.as_object_mut() {
        if spec.moe.layout == ExpertLayout::Mxfp4 {
            object.remove("quantization_config");
        }
        object.insert(
            CONFIG_KEY.into(),
            serde_json::json!({ "dtype": dtype.to_string(), "group_size": QUANT_GROUP, "layout": "ferry-slot" }),
        );
    }
    let target = out.join("config.json");
    let pretty = serde_json::to_string_pretty(&config).map_err(|e| FerryError::io(&target, e))?;
    std::fs::write(&target, pretty).map_err(|e| FerryError::io(&target, e))
}

/// Names of the routed experts' weight tensors (not their biases), which the output replaces.
fn expert_tensor_names(spec: &ModelSpec, moe_layers: &[usize]) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for &layer in moe_layers {
        let fused = spec.names.layer(layer, &spec.names.fused_experts);
        match spec.moe.layout {
            ExpertLayout::PerExpert => {
                names.extend((0..spec.moe.num_experts).flat_map(|e| spec.names.expert_weights(layer, e)));
            }
            ExpertLayout::Fused => names.extend(["gate_up_proj", "down_proj"].map(|p| format!("{fused}.{p}"))),
            ExpertLayout::Mxfp4 => names.extend(
                ["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"]
                    .map(|p| format!("{fused}.{p}")),
            ),
            ExpertLayout::Prequantised(_) => {}
        }
    }
    names
}
