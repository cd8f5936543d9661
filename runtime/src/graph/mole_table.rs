//! Re-parameterisation of a MoLE checkpoint: every lookup expert of every layer evaluated on
//! every vocabulary entry, written as the lookup table (format in `crate::lut`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::linear::Loader;
use super::mole::{LookupFfns, mole_spec};
use crate::error::{FerryError, Result};
use crate::lut::{LutDtype, LutHeader};
use crate::spec::{FfnKind, ModelSpec};
use crate::weights::WeightStore;

/// Tokens evaluated per GPU batch.
const CHUNK_TOKENS: usize = 256;

/// The table header a MoLE spec implies (dtype as given).
pub fn lookup_header(spec: &ModelSpec, dtype: LutDtype) -> Result<LutHeader> {
    let mole = mole_spec(spec)?;
    Ok(LutHeader {
        dtype,
        vocab: spec.vocab_size,
        layers: spec.layers.iter().filter(|k| matches!(k, FfnKind::Mole)).count(),
        experts: mole.num_experts,
        d_model: spec.hidden_size,
    })
}

/// Evaluates the expert FFNs of `store` on every token and writes the table to `path`, calling
/// `on_progress(tokens_done, vocab)` after each batch. Returns the header written.
pub fn write_lookup_table(
    spec: &ModelSpec,
    store: &WeightStore,
    device: &Device,
    path: &Path,
    dtype: LutDtype,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<LutHeader> {
    let header = lookup_header(spec, dtype)?;
    let mole = mole_spec(spec)?;
    // The table is the experts' exact evaluation: f32 whatever the model later runs in.
    let limit = super::model::max_buffer_bytes(device, None)?;
    // Whole dot products: the table does not depend on the adapter that built it.
    let split = ferry_shaders::split::Split::WHOLE;
    let loader = Loader { store, device, dense: crate::options::DenseDtype::F32, limit, split, route_on_device: false };
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    let embed = loader.matrix(&spec.names.embed, v, h)?;
    let layers = (0..spec.num_layers())
        .filter(|&l| matches!(spec.layers[l], FfnKind::Mole))
        .map(|l| LookupFfns::load(&loader, spec, mole, l))
        .collect::<Result<Vec<_>>>()?;
    let file = File::create(path).map_err(|e| FerryError::io(path, e))?;
    let mut out = BufWriter::new(file);
    out.write_all(&header.encode()?).map_err(|e| FerryError::io(path, e))?;
    let mut bytes = Vec::new();
    for start in (0..v).step_by(CHUNK_TOKENS) {
        let end = (start + CHUNK_TOKENS).min(v);
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new((start as i64..end as i64).collect(), [end - start]), device);
        let embedded = embed.clone().select(0, ids);
        // [tokens, layers * experts, hidden] -> one row per token, ordered [layer][expert][d].
        let outs: Vec<Tensor<3>> = layers.iter().map(|f| f.forward(embedded.clone(), spec.rms_norm_eps)).collect();
        let rows = Tensor::cat(outs, 1).reshape([end - start, header.row_len()]);
        let values = super::read_f32(rows, "table rows")?;
        bytes.clear();
        dtype.encode(&values, &mut bytes);
        out.write_all(&bytes).map_err(|e| FerryError::io(path, e))?;
        on_progress(end, v);
    }
    out.flush().map_err(|e| FerryError::io(path, e))?;
    Ok(header)
}
