//! Per-layer key/value cache, preallocated for the whole sequence and written in place.

use burn::tensor::{Device, Tensor};

/// Keys and values `[kv_heads, capacity, head_dim]` for every layer, plus how many positions
/// are filled. MLA layers keep one tensor, `[1, capacity, kv_lora_rank + qk_rope_head_dim]`:
/// each position's latent followed by its shared rope key (`joint`), so that a decode step
/// attends over the cache where it lies instead of joining the two every step.
///
/// A layer with a sliding window keeps only the `window - 1` most recent positions, all a later
/// query can see, so its cache stays bounded however long the sequence grows.
pub struct KvCache {
    keys: Vec<Option<Tensor<3>>>,
    values: Vec<Option<Tensor<3>>>,
    /// Per layer: the sliding window, or None for a full cache preallocated to `capacity`.
    windows: Vec<Option<usize>>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// `keys` and `values` are the `[heads, dim]` of one layer's two cached tensors; `windows`
    /// has one entry per layer.
    pub fn new(
        windows: Vec<Option<usize>>,
        keys: [usize; 2],
        values: [usize; 2],
        capacity: usize,
        device: &Device,
    ) -> Self {
        // Windowed layers start empty and grow to `window - 1` positions.
        let empty = |[heads, dim]: [usize; 2], window: Option<usize>| {
            let len = if window.is_some() { 0 } else { capacity };
            Some(Tensor::zeros([heads, len, dim], device))
        };
        Self {
            keys: windows.iter().map(|&w| empty(keys, w)).collect(),
            values: windows.iter().map(|&w| empty(values, w)).collect(),
            windows,
            capacity,
            len: 0,
        }
    }

    /// A cache of one tensor per layer, `[heads, capacity, width]`, written part by part with
    /// `append_joint` (MLA: the latent, then the rope key). No sliding windows.
    pub fn joint(layers: usize, [heads, width]: [usize; 2], capacity: usize, device: &Device) -> Self {
        Self {
            keys: (0..layers).map(|_| Some(Tensor::zeros([heads, capacity, width], device))).collect(),
            values: vec![None; layers],
            windows: vec![None; layers],
            capacity,
            len: 0,
        }
    }

    /// Writes `parts` (each `[heads, tokens, width_i]`, the widths adding up to the cache's) side
    /// by side at the current end of a `joint` cache and returns every filled position
    /// `[heads, positions, width]`.
    pub fn append_joint(&mut self, layer: usize, parts: Vec<Tensor<3>>) -> Tensor<3> {
        let mut t = self.keys[layer].take().expect("kv cache layer in use");
        let [heads, _, width] = t.dims();
        let (start, mut lane) = (self.len, 0);
        let mut end = start;
        for part in parts {
            let [_, tokens, w] = part.dims();
            end = start + tokens;
            // Taken out of the cache, the tensor is uniquely owned: slice_assign writes in place.
            t = t.slice_assign([0..heads, start..end, lane..lane + w], part);
            lane += w;
        }
        debug_assert_eq!(lane, width, "joint cache parts must fill its width");
        self.keys[layer] = Some(t.clone());
        t.slice([0..heads, 0..end, 0..width])
    }

    /// Positions layer `layer` holds: every one for a full layer, at most `window - 1` for a
    /// windowed one.
    pub fn held(&self, layer: usize) -> usize {
        self.keys[layer].as_ref().map_or(0, |k| if self.windows[layer].is_some() { k.dims()[1] } else { self.len })
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

    /// Writes `k`, `v` `[kv_heads, tokens, head_dim]` at the current end and returns the cached
    /// keys and values this pass attends over, including the new ones, with the position of the
    /// first: everything from 0 for a full layer, the last `window - 1` positions before this
    /// pass for a windowed one. The cache length moves on in `advance`.
    pub fn append(&mut self, layer: usize, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>, usize) {
        let (start, end) = (self.len, self.len + k.dims()[1]);
        let old_keys = self.keys[layer].take().expect("kv cache layer in use");
        let old_values = self.values[layer].take().expect("kv cache layer in use");
        if let Some(window) = self.windows[layer] {
            let kept = old_keys.dims()[1];
            let keys = Tensor::cat(vec![old_keys, k], 1);
            let values = Tensor::cat(vec![old_values, v], 1);
            let total = keys.dims()[1];
            let keep = window.saturating_sub(1).min(total);
            let recent = |t: &Tensor<3>| {
                let [heads, _, dim] = t.dims();
                t.clone().slice([0..heads, total - keep..total, 0..dim])
            };
            self.keys[layer] = Some(recent(&keys));
            self.values[layer] = Some(recent(&values));
            return (keys, values, start - kept);
        }
        let write = |t: Tensor<3>, new: Tensor<3>| {
            let [heads, _, dim] = new.dims();
            // Taking the tensor out leaves it uniquely owned, so slice_assign writes in place.
            let t = t.slice_assign([0..heads, start..end, 0..dim], new);
            (t.clone(), t.slice([0..heads, 0..end, 0..dim]))
        };
        let (keys, filled_keys) = write(old_keys, k);
        let (values, filled_values) = write(old_values, v);
        self.keys[layer] = Some(keys);
        self.values[layer] = Some(values);
        (filled_keys, filled_values, 0)
    }

    /// Marks `tokens` more positions as filled, after every layer has appended them.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
