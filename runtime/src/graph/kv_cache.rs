//! Per-layer key/value cache, preallocated for the whole sequence and written in place.

use burn::tensor::{Device, Tensor};

/// Keys and values `[kv_heads, capacity, head_dim]` for every layer, plus how many positions
/// are filled.
pub struct KvCache {
    keys: Vec<Option<Tensor<3>>>,
    values: Vec<Option<Tensor<3>>>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize, device: &Device) -> Self {
        let empty = || Some(Tensor::zeros([kv_heads, capacity, head_dim], device));
        Self {
            keys: (0..layers).map(|_| empty()).collect(),
            values: (0..layers).map(|_| empty()).collect(),
            capacity,
            len: 0,
        }
    }

    /// Positions already cached, in tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold, in tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`, `v` `[kv_heads, tokens, head_dim]` at the current end and returns all cached
    /// keys and values up to and including them. The cache length moves on in `advance`.
    pub fn append(&mut self, layer: usize, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let [heads, tokens, dim] = k.dims();
        let range = [0..heads, self.len..self.len + tokens, 0..dim];
        let filled = [0..heads, 0..self.len + tokens, 0..dim];
        // Taking the tensor out leaves it uniquely owned, so slice_assign can write in place.
        let keys = self.keys[layer].take().expect("kv cache layer in use").slice_assign(range.clone(), k);
        let values = self.values[layer].take().expect("kv cache layer in use").slice_assign(range, v);
        self.keys[layer] = Some(keys.clone());
        self.values[layer] = Some(values.clone());
        (keys.slice(filled.clone()), values.slice(filled))
    }

    /// Marks `tokens` more positions as filled, after every layer has appended them.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
