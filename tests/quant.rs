//! Quantised experts (`--expert-dtype int8|int4|int3|int2|mxfp4`, f16): offloading them stays exact (offloaded output
//! equals all-resident output of the same dtype bit for bit), every upload moves the quantised
//! size, and their logits stay near transformers' (int8 nearer than int4). f16 projections
//! (`--dense-dtype f16`): near transformers, offloading exact, half the resident bytes.

use ferry_runtime::engine::Engine;
use ferry_runtime::graph::{ForwardOutput, LogitsFor, Model};
use ferry_runtime::options::{DenseDtype, ExpertOptions};
use ferry_runtime::options::{ExpertDtype, VramBudget};
use ferry_runtime::spec::ExpertLayout;

use crate::support::{FAMILIES, fixture, gpu, greedy, max_abs_diff, reference};

fn load(family: &str, budget: VramBudget, expert_dtype: ExpertDtype) -> Model {
    let opened = ferry_models::open(&fixture(family)).unwrap();
    let options = ExpertOptions { budget, expert_dtype, ..Default::default() };
    Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
}

fn prompt_forward(model: &mut Model, ids: &[u32]) -> ForwardOutput {
    let mut cache = model.new_cache(ids.len()).unwrap();
    model.forward(ids, &mut cache, LogitsFor::All).unwrap()
}

#[test]
fn offloaded_quantised_experts_equal_all_resident_quantised_experts_bit_for_bit() {
    for family in ["mixtral", "qwen3_moe"] {
        let ids = reference(family).input_ids;
        for dtype in [
            ExpertDtype::F16,
            ExpertDtype::Bf16,
            ExpertDtype::Int8,
            ExpertDtype::Int4,
            ExpertDtype::Int3,
            ExpertDtype::Int2,
            ExpertDtype::Mxfp4,
        ] {
            let expected = prompt_forward(&mut load(family, VramBudget::All, dtype), &ids);
            let mut model = load(family, VramBudget::FractionOfExperts(0.25), dtype);
            let out = prompt_forward(&mut model, &ids);
            assert_eq!(out.logits, expected.logits, "{family} {dtype}: offloaded differs from all-resident");
            assert_eq!(out.routing, expected.routing, "{family} {dtype}");
            let stats = model.experts().stats();
            let spec = model.spec();
            let size = dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
            assert!(stats.misses > 0, "{family} {dtype}");
            assert_eq!(stats.bytes_uploaded, stats.misses * size, "{family} {dtype}: bytes per upload");
            let factor = if matches!(dtype, ExpertDtype::F16 | ExpertDtype::Bf16) { 2 } else { 3 };
            assert!(size * factor <= dtype_f32_size(spec), "{family} {dtype}: the slot is not smaller");
        }
    }
}

/// A BF16 checkpoint's experts in bf16 slots are the f32 path's values summed in the same order:
/// logits and routing equal f32 experts' bit for bit, resident and offloaded, and every miss moves
/// half of f32's bytes.
#[test]
fn bf16_experts_equal_f32_experts_bit_for_bit_on_bf16_checkpoints() {
    for family in ["mixtral", "deepseek_v2", "deepseek_v3"] {
        let ids = reference(family).input_ids;
        let expected = prompt_forward(&mut load(family, VramBudget::All, ExpertDtype::F32), &ids);
        for budget in [VramBudget::All, VramBudget::FractionOfExperts(0.25)] {
            let mut model = load(family, budget, ExpertDtype::Bf16);
            let out = prompt_forward(&mut model, &ids);
            assert_eq!(out.logits, expected.logits, "{family} {budget:?}: bf16 experts differ from f32");
            assert_eq!(out.routing, expected.routing, "{family} {budget:?}");
            let stats = model.experts().stats();
            let spec = model.spec();
            assert_eq!(stats.bytes_uploaded, stats.misses * dtype_f32_size(spec) / 2, "{family}: bytes per upload");
        }
    }
}

/// BF16 projections as bf16 pairs are the f32 path's values summed in the same order: on BF16
/// checkpoints the prefill (widened for the matmul) and every decode step (the pair kernel) give
/// f32 projections' logits and tokens bit for bit, with the projections at two bytes in the plan.
#[test]
fn bf16_projections_equal_f32_projections_bit_for_bit_on_bf16_checkpoints() {
    let load = |family: &str, dense_dtype: DenseDtype| {
        let opened = ferry_models::open(&fixture(family)).unwrap();
        let options = ExpertOptions { dense_dtype, ..Default::default() };
        Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
    };
    for family in ["mixtral", "deepseek_v2", "deepseek_v3"] {
        let reference = reference(family);
        let mut f32_model = load(family, DenseDtype::F32);
        let mut bf16_model = load(family, DenseDtype::Bf16);
        assert_eq!(
            ferry_runtime::graph::stored_dense_dtype(
                &ferry_models::open(&fixture(family)).unwrap().weights,
                f32_model.spec()
            ),
            DenseDtype::Bf16,
            "{family}: auto picks bf16 for a BF16 checkpoint"
        );
        let expected = prompt_forward(&mut f32_model, &reference.input_ids);
        let out = prompt_forward(&mut bf16_model, &reference.input_ids);
        assert_eq!(out.logits, expected.logits, "{family}: bf16 projections differ from f32 in a prefill");
        let smaller = bf16_model.experts().plan().resident_bytes;
        assert!(smaller < f32_model.experts().plan().resident_bytes, "{family}: the plan counts two bytes");
        let prompt = &reference.greedy.prompt_ids;
        let (mut f32_engine, mut bf16_engine) = (Engine::new(f32_model, None), Engine::new(bf16_model, None));
        assert_eq!(greedy(&mut bf16_engine, prompt, 8), greedy(&mut f32_engine, prompt, 8), "{family}: decode");
    }
}

fn dtype_f32_size(spec: &ferry_runtime::ModelSpec) -> u64 {
    ExpertDtype::F32.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size)
}

#[test]
fn quantised_logits_stay_near_transformers_and_int8_nearer_than_int4() {
    // GPT-OSS's fixture has experts large enough for its clamp to cut, and int8 rounding already
    // flips some of its routes; its experts ship in MXFP4, checked in tests/families.rs.
    for family in FAMILIES.into_iter().filter(|&f| f != "gpt_oss") {
        let reference = reference(family);
        let error = |dtype| {
            let out = prompt_forward(&mut load(family, VramBudget::All, dtype), &reference.input_ids);
            let (diff, scale) = max_abs_diff(&out.logits, &reference.logits);
            diff / scale
        };
        let (f32, int8, int4) = (error(ExpertDtype::F32), error(ExpertDtype::Int8), error(ExpertDtype::Int4));
        let (f16, int3) = (error(ExpertDtype::F16), error(ExpertDtype::Int3));
        assert!(f32 < 1e-4, "{family}: f32 {f32}");
        // BF16 and F16 checkpoints fit f16 slots exactly (up to range), F32 ones are rounded.
        assert!(f16 < 2e-3, "{family}: f16 relative error {f16}");
        assert!(f16 <= int8, "{family}: f16 {f16} worse than int8 {int8}");
        assert!(int8 < 0.02, "{family}: int8 relative error {int8}");
        assert!(int4 < 0.3, "{family}: int4 relative error {int4}");
        assert!(int4 <= int3 && int3 < 0.8, "{family}: int3 relative error {int3} (int4 {int4})");
        assert!(f32 <= int8 && int8 <= int4, "{family}: errors not ordered: f32 {f32}, int8 {int8}, int4 {int4}");
        eprintln!(
            "{family}: max |logit error| / max |logit|: f32 {f32:.2e}, f16 {f16:.2e}, int8 {int8:.2e}, int4 {int4:.2e}, int3 {int3:.2e}"
        );
    }
}

/// `ferry convert quantize` stores experts in the slot layout: loading the converted folder gives
/// exactly what quantising at load gives (int4 from BF16/F32 experts, MXFP4 from GPT-OSS's own
/// MXFP4 blocks), its experts take the quantised bytes on disk, and a converted folder is not
/// converted twice.
#[test]
fn converted_folders_equal_quantising_at_load() {
    for (family, dtype) in [
        ("qwen3_moe", ExpertDtype::Int4),
        ("gpt_oss", ExpertDtype::Mxfp4),
        ("deepseek_v3", ExpertDtype::Int8),
        ("mixtral", ExpertDtype::Int3),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("converted");
        let done = ferry_models::quantize::quantize_folder(&fixture(family), &out, dtype, |_, _| {}).unwrap();
        let opened = ferry_models::open(&out).unwrap();
        assert_eq!(opened.spec.moe.layout, ExpertLayout::Prequantised(dtype), "{family}");
        let spec = &opened.spec;
        let per_expert = dtype.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size) as usize;
        assert_eq!(done.output_expert_bytes, done.experts * per_expert, "{family}");
        let ids = reference(family).input_ids;
        let options =
            ExpertOptions { expert_dtype: dtype, budget: VramBudget::FractionOfExperts(0.25), ..Default::default() };
        let mut converted = Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap();
        let out_logits = prompt_forward(&mut converted, &ids);
        let expected = prompt_forward(&mut load(family, VramBudget::All, dtype), &ids);
        assert_eq!(
            out_logits.logits, expected.logits,
            "{family} {dtype}: converted differs from load-time quantisation"
        );
        let err = ferry_models::quantize::quantize_folder(&out, &tmp.path().join("again"), dtype, |_, _| {})
            .expect_err("a converted folder must not be converted again")
            .to_string();
        assert!(err.contains("already quantised"), "{err}");
    }
}

fn load_f16_projections(family: &str, budget: VramBudget) -> Model {
    let opened = ferry_models::open(&fixture(family)).unwrap();
    let options = ExpertOptions { budget, dense_dtype: DenseDtype::F16, ..Default::default() };
    Model::load_with(opened.spec, &opened.weights, &gpu().device, options).unwrap()
}

/// f16 projections round the fixtures' F32 weights to half precision: logits stay within a
/// small error of transformers' (prefill and the decode kernel alike), an offloaded model equals
/// the all-resident one bit for bit, and the plan holds the projections at two bytes.
#[test]
fn f16_projections_stay_near_transformers_and_offload_exactly() {
    for family in FAMILIES {
        let reference = reference(family);
        let mut resident = load_f16_projections(family, VramBudget::All);
        let out = prompt_forward(&mut resident, &reference.input_ids);
        let (diff, scale) = max_abs_diff(&out.logits, &reference.logits);
        assert!(diff / scale < 5e-3, "{family}: f16 projections relative error {}", diff / scale);
        eprintln!("{family}: f16 projections max |logit error| / max |logit| {:.2e}", diff / scale);

        let mut offloaded = load_f16_projections(family, VramBudget::FractionOfExperts(0.25));
        assert_eq!(prompt_forward(&mut offloaded, &reference.input_ids).logits, out.logits, "{family}: offloaded");
        let prompt = &reference.greedy.prompt_ids;
        let (mut resident, mut offloaded) = (Engine::new(resident, None), Engine::new(offloaded, None));
        assert_eq!(greedy(&mut offloaded, prompt, 8), greedy(&mut resident, prompt, 8), "{family}: offloaded decode");

        let spec = resident.model.spec();
        let f32_bytes = VramBudget::All.plan(spec, 16).unwrap().resident_bytes;
        let plan = offloaded.model.experts().plan().clone();
        assert_eq!(f32_bytes - plan.resident_bytes, 2 * spec.projection_params() as u64, "{family}: plan");
    }
}
