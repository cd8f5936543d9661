//! Per-layer key/value cache, preallocated for the whole sequence and written in place.

use burn::tensor::{Device, Tensor};

/// Keys and values `[kv_heads, capacity, head_dim]` for every layer, plus how many positions
/// are filled. MLA layers keep their latent as the "keys" `[1, capacity, kv_lora_rank]` and the
/// shared rope key as the "values" `[1, capacity, qk_rope_head_dim]`.
pub struct KvCache {
    keys: Vec<Option<Tensor<3>>>,
    values: Vec<Option<Tensor<3>>>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// `keys` and `values` are the `[heads, dim]` of one layer's two cached tensors.
    pub fn new(layers: usize, keys: [usize; 2], values: [usize; 2], capacity: usize, device: &Device) -> Self {
        let empty = |[heads, dim]: [usize; 2]| Some(Tensor::zeros([heads, capacity, dim], device));
        Self {
            keys: (0..layers).map(|_| empty(keys)).collect(),
            values: (0..layers).map(|_| empty(values)).collect(),
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
        let (start, end) = (self.len, self.len + k.dims()[1]);
        let write = |t: Tensor<3>, new: Tensor<3>| {
            let [heads, _, dim] = new.dims();
            // Taking the tensor out leaves it uniquely owned, so slice_assign writes in place.
            let t = t.slice_assign([0..heads, start..end, 0..dim], new);
            (t.clone(), t.slice([0..heads, 0..end, 0..dim]))
        };
        let (keys, filled_keys) = write(self.keys[layer].take().expect("kv cache layer in use"), k);
        let (values, filled_values) = write(self.values[layer].take().expect("kv cache layer in use"), v);
        self.keys[layer] = Some(keys);
        self.values[layer] = Some(values);
        (filled_keys, filled_values)
    }

    /// Marks `tokens` more positions as filled, after every layer has appended them.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
