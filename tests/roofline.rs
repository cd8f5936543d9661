//! The roofline's byte count of a decode step, checked against the checkpoints themselves: with
//! every expert computed and no KV cache, a step reads every tensor once except the embedding,
//! of which it reads one row.

use ferry_runtime::measure::roofline::DecodeBytes;
use ferry_runtime::options::DenseDtype;
use ferry_runtime::options::ExpertDtype;

use crate::support::{FAMILIES, fixture};

#[test]
fn decode_bytes_with_every_expert_equal_the_checkpoint_minus_all_but_one_embedding_row() {
    for family in FAMILIES {
        let opened = ferry_models::open(&fixture(family)).unwrap();
        let spec = &opened.spec;
        // Weights per tensor; MXFP4 blocks hold two per byte, and their scales are not weights.
        let elements = |name: &str| {
            let count = opened.weights.tensor(name).map_or(0, |t| t.shape.iter().product::<usize>());
            if name.ends_with("_scales") {
                0
            } else if name.ends_with("_blocks") {
                2 * count
            } else {
                count
            }
        };
        let all: usize = opened.weights.names().iter().map(|n| elements(n)).sum();
        let unread = if spec.tie_word_embeddings { 0 } else { elements(&spec.names.embed) - spec.hidden_size };
        let bytes = DecodeBytes::of(spec, 0, spec.moe.num_experts as f64, ExpertDtype::F32, DenseDtype::F32);
        assert_eq!(bytes.kv_cache, 0, "{family}");
        assert_eq!(bytes.dense + bytes.experts, 4 * (all - unread) as u64, "{family}");
        let a = &spec.attention;
        let later = DecodeBytes::of(spec, 10, 1.0, ExpertDtype::F32, DenseDtype::F32);
        let int8 = DecodeBytes::of(spec, 10, 1.0, ExpertDtype::Int8, DenseDtype::F32);
        let moe_layers = spec.layers.iter().filter(|l| matches!(l, ferry_runtime::spec::FfnKind::Moe)).count();
        let slot = ExpertDtype::Int8.expert_bytes(spec.hidden_size, spec.moe.expert_intermediate_size);
        assert_eq!(int8.experts, moe_layers as u64 * slot, "{family}");
        assert_eq!((int8.dense, int8.kv_cache), (later.dense, later.kv_cache), "{family}");
        // Keys and values per KV head, or MLA's latent and rope key; sliding layers hold at most
        // their window (none of the fixtures' windows is under 10 except GPT-OSS's).
        let per_layer = |l: usize| a.window(l).map_or(10, |w| w.min(10));
        let elements: usize = (0..spec.num_layers()).map(per_layer).sum::<usize>() * a.kv_elements_per_token();
        assert_eq!(later.kv_cache, 4 * elements as u64, "{family}");
        if a.mla.is_none() {
            assert_eq!(a.kv_elements_per_token(), 2 * a.num_kv_heads * a.head_dim, "{family}");
        }
    }
}

/// What `--dense-dtype f16` stores at half size: every 2-D tensor outside the routed experts
/// except biases (projections, routers, shared FFNs, the LM head), and of an untied embedding
/// nothing, since its rows are read on the host. The roofline and the budget count exactly those
/// at two bytes.
#[test]
fn f16_projections_halve_the_checkpoints_projection_matrices() {
    for family in FAMILIES {
        let opened = ferry_models::open(&fixture(family)).unwrap();
        let spec = &opened.spec;
        let matrices: usize = opened
            .weights
            .names()
            .iter()
            .filter(|n| !n.contains(".experts.") && !n.ends_with("bias"))
            .filter_map(|n| opened.weights.tensor(n))
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let untied = if spec.tie_word_embeddings { 0 } else { spec.vocab_size * spec.hidden_size };
        assert_eq!(spec.projection_params(), matrices - untied, "{family}");
        let f32 = DecodeBytes::of(spec, 10, 1.0, ExpertDtype::F32, DenseDtype::F32);
        let f16 = DecodeBytes::of(spec, 10, 1.0, ExpertDtype::F32, DenseDtype::F16);
        assert_eq!(f32.dense - f16.dense, 2 * spec.projection_params() as u64, "{family}");
        assert_eq!((f32.experts, f32.kv_cache), (f16.experts, f16.kv_cache), "{family}");
    }
}
