//! The vocabulary-sized matrices: the token embedding, looked up on the host, and the LM head,
//! split into row blocks that each fit one GPU binding.
//!
//! A real vocabulary makes these the largest tensors of a model (GPT-OSS: 201088 x 2880, 2.2 GiB
//! in f32), beyond the storage-binding limit of many adapters (128 MiB on lavapipe). The
//! embedding needs one row per token, so it is read from the mapped checkpoint and uploaded
//! `[tokens, hidden]`; an untied embedding then takes no GPU memory at all. The LM head is kept
//! in blocks of rows; each block's logits are read back separately.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};

use super::linear::{Loader, StoredMatrix, transposed};
use crate::error::{FerryError, Result};
use crate::weights::{TensorRef, WeightStore, to_f32};

/// Reads embedding rows from the checkpoint.
pub struct Embedding {
    store: Arc<WeightStore>,
    name: String,
    tensor: TensorRef,
    hidden: usize,
}

impl Embedding {
    pub fn open(store: &Arc<WeightStore>, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        let tensor = store.float(name, &[vocab, hidden])?.clone();
        Ok(Self { store: Arc::clone(store), name: name.to_string(), tensor, hidden })
    }

    /// `[tokens, hidden]` rows for `ids` (already checked against the vocabulary). Rows are
    /// checked to be finite as they are read (the whole table is never scanned).
    pub fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>> {
        let bytes = self.store.bytes(&self.tensor);
        let row = self.hidden * self.tensor.dtype.size();
        let values: Vec<f32> =
            ids.iter().flat_map(|&id| to_f32(&bytes[id as usize * row..][..row], self.tensor.dtype)).collect();
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(FerryError::NonFinite(format!(
                "tensor {:?}, row {} (a token's embedding), holds {}; weights must be finite",
                self.name,
                ids[at / self.hidden],
                values[at]
            )));
        }
        Ok(Tensor::from_data(TensorData::new(values, [ids.len(), self.hidden]), device))
    }
}

/// `[vocab, hidden]` in row blocks of at most `max_bytes` each, each kept transposed
/// (`[hidden, block rows]`) so that a decode step's product reads it in order.
pub struct LmHead {
    blocks: Vec<StoredMatrix>,
    vocab: usize,
}

impl LmHead {
    pub fn load(loader: &Loader, name: &str, vocab: usize, hidden: usize, max_bytes: u64) -> Result<Self> {
        let values = loader.store.f32(name, &[vocab, hidden])?;
        let row_bytes = (hidden * 4) as u64;
        let rows = (max_bytes / row_bytes.max(1)) as usize;
        if rows == 0 {
            return Err(FerryError::Gpu(format!(
                "one row of {name:?} ({row_bytes} bytes) is larger than the largest GPU buffer ({max_bytes} bytes)"
            )));
        }
        let blocks = values
            .chunks(rows * hidden)
            .map(|chunk| {
                let block =
                    Tensor::from_data(TensorData::new(chunk.to_vec(), [chunk.len() / hidden, hidden]), loader.device);
                loader.stored(transposed(block), name)
            })
            .collect::<Result<_>>()?;
        Ok(Self { blocks, vocab })
    }

    /// Blocks the head is split into.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Logits `[rows][vocab]` of `x` `[rows, hidden]`, one read-back per block.
    pub fn logits(&self, x: Tensor<2>) -> Result<Vec<Vec<f32>>> {
        let rows = x.dims()[0];
        let mut logits = vec![Vec::with_capacity(self.vocab); rows];
        for block in &self.blocks {
            // [rows, hidden] x [hidden, block rows].
            let part = block.product(&x, None);
            let width = part.dims()[1];
            let values = super::read_f32(part, "logits")?;
            for (out, chunk) in logits.iter_mut().zip(values.chunks_exact(width)) {
                out.extend_from_slice(chunk);
            }
        }
        Ok(logits)
    }
}
