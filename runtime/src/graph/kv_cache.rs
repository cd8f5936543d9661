//! Per-layer key/value cache in pages: a layer's positions are split into page tensors of at most
//! `page` positions, each within one GPU binding, allocated as the sequence reaches them and
//! written in place. Attention reads across the pages (`ferry_shaders::flash`), so a context is
//! not limited by the largest buffer an adapter can bind, and a layer with a sliding window drops
//! the pages its queries can no longer see.

use burn::tensor::{Device, Tensor};
use ferry_shaders::flash::BLOCK;

/// One page of a layer: positions `start..start + len` of keys `[heads, len, dim]` and values (a
/// joint cache keeps one tensor, the caller's parts side by side).
struct CachePage {
    start: usize,
    keys: Tensor<3>,
    values: Option<Tensor<3>>,
}

/// What one pass attends over on one page: the filled positions `start..start + n` of the keys
/// and values (`values` None for a joint cache).
pub struct PageView {
    pub keys: Tensor<3>,
    pub values: Option<Tensor<3>>,
    pub start: usize,
}

pub struct KvCache {
    pages: Vec<Vec<CachePage>>,
    /// Per layer: the sliding window, or None for a layer that keeps every position.
    windows: Vec<Option<usize>>,
    /// `[heads, dim]` of keys, and of values (None: a joint cache).
    key_shape: [usize; 2],
    value_shape: Option<[usize; 2]>,
    /// Positions per page: a multiple of `BLOCK` (64), so page starts stay on the block grid a
    /// split-key decode kernel would use; attention's results do not depend on the page size.
    page: usize,
    capacity: usize,
    len: usize,
    device: Device,
}

impl KvCache {
    /// `keys` and `values` are the `[heads, dim]` of one layer's two cached tensors; `windows`
    /// has one entry per layer; `page` positions per page (rounded down to a multiple of `BLOCK`,
    /// at least one block).
    pub fn new(
        windows: Vec<Option<usize>>,
        keys: [usize; 2],
        values: [usize; 2],
        capacity: usize,
        page: usize,
        device: &Device,
    ) -> Self {
        Self {
            pages: windows.iter().map(|_| Vec::new()).collect(),
            windows,
            key_shape: keys,
            value_shape: Some(values),
            page: (page / BLOCK).max(1) * BLOCK,
            capacity,
            len: 0,
            device: device.clone(),
        }
    }

    /// A cache of one tensor per page, `[heads, positions, width]`, written part by part with
    /// `append_joint` (MLA: the latent, then the rope key). No sliding windows.
    pub fn joint(layers: usize, shape: [usize; 2], capacity: usize, page: usize, device: &Device) -> Self {
        let mut cache = Self::new(vec![None; layers], shape, shape, capacity, page, device);
        cache.value_shape = None;
        cache
    }

    /// Writes `parts` (each `[heads, tokens, width_i]`, the widths adding up to the cache's) side
    /// by side at the current end of a `joint` cache and returns the pages of every filled
    /// position.
    pub fn append_joint(&mut self, layer: usize, parts: Vec<Tensor<3>>) -> Vec<PageView> {
        let mut lane = 0;
        let mut columns = Vec::with_capacity(parts.len());
        for part in parts {
            let w = part.dims()[2];
            columns.push((lane..lane + w, part));
            lane += w;
        }
        debug_assert_eq!(lane, self.key_shape[1], "joint cache parts must fill its width");
        let end = self.write(layer, &columns, None);
        self.views(layer, end)
    }

    /// Writes `k`, `v` `[kv_heads, tokens, head_dim]` at the current end and returns the pages
    /// this pass attends over, including the new positions: every page for a full layer, those
    /// its queries can still see for a windowed one. The cache length moves on in `advance`.
    pub fn append(&mut self, layer: usize, k: Tensor<3>, v: Tensor<3>) -> Vec<PageView> {
        let width = k.dims()[2];
        let value_width = v.dims()[2];
        let end = self.write(layer, &[(0..width, k)], Some((0..value_width, v)));
        self.views(layer, end)
    }

    /// Positions layer `layer` holds: every one for a full layer; for a windowed one, those on
    /// pages it still keeps.
    pub fn held(&self, layer: usize) -> usize {
        let end = self.len;
        self.pages[layer].first().map_or(0, |p| end.saturating_sub(p.start))
    }

    /// Bytes the pages allocated so far take on the GPU (f32).
    pub fn bytes(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| {
                let count = |t: &Tensor<3>| t.dims().iter().product::<usize>() as u64;
                4 * (count(&p.keys) + p.values.as_ref().map_or(0, count))
            })
            .sum()
    }

    /// Positions per page.
    pub fn page_positions(&self) -> usize {
        self.page
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

    /// Forgets the positions from `len` on (a failed pass's): the next pass writes over them.
    /// Pages a windowed layer dropped while running them stay dropped, so after a failure a
    /// model with sliding windows needs a new cache to continue exactly.
    pub fn rewind(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Marks `tokens` more positions as filled, after every layer has appended them.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Positions per page of `layer`: a windowed layer needs little more than its window.
    fn page_of(&self, layer: usize) -> usize {
        match self.windows[layer] {
            Some(w) => self.page.min(w.div_ceil(BLOCK).max(1) * BLOCK),
            None => self.page,
        }
    }

    /// Writes `columns` of the keys (and `values`) for positions `len..len + tokens` into the
    /// layer's pages, allocating the pages it reaches and, for a windowed layer, first dropping
    /// those no query of this pass can see. Returns the end of the written positions.
    fn write(
        &mut self,
        layer: usize,
        columns: &[(std::ops::Range<usize>, Tensor<3>)],
        values: Option<(std::ops::Range<usize>, Tensor<3>)>,
    ) -> usize {
        let tokens = columns[0].1.dims()[1];
        let (start, end) = (self.len, self.len + tokens);
        let page = self.page_of(layer);
        if let Some(w) = self.windows[layer] {
            // The pass's first query, at `start`, sees keys after `start - w`.
            let first_seen = (start + 1).saturating_sub(w);
            self.pages[layer].retain(|p| p.start + page > first_seen);
        }
        // Allocate the pages this pass reaches.
        let mut next = self.pages[layer].last().map_or(start / page * page, |p| p.start + page);
        while next < end {
            let len = page.min(self.capacity.max(end) - next);
            let [heads, dim] = self.key_shape;
            let keys = Tensor::zeros([heads, len, dim], &self.device);
            let values = self.value_shape.map(|[heads, dim]| Tensor::zeros([heads, len, dim], &self.device));
            self.pages[layer].push(CachePage { start: next, keys, values });
            next += page;
        }
        for p in self.pages[layer].iter_mut() {
            let len = p.keys.dims()[1];
            let (from, to) = (start.max(p.start), end.min(p.start + len));
            if from >= to {
                continue;
            }
            let (rows, local) = (from - start..to - start, from - p.start..to - p.start);
            // Replaced, the page is uniquely owned: slice_assign writes in place.
            let assign = |t: Tensor<3>, lanes: &std::ops::Range<usize>, part: &Tensor<3>| {
                let heads = t.dims()[0];
                let part = part.clone().slice([0..heads, rows.clone(), 0..lanes.len()]);
                t.slice_assign([0..heads, local.clone(), lanes.clone()], part)
            };
            let mut keys = std::mem::replace(&mut p.keys, Tensor::empty([0, 0, 0], &self.device));
            for (lanes, part) in columns {
                keys = assign(keys, lanes, part);
            }
            p.keys = keys;
            if let (Some((lanes, part)), Some(v)) = (&values, p.values.take()) {
                p.values = Some(assign(v, lanes, part));
            }
        }
        end
    }

    /// The filled part of each of the layer's pages, up to `end`.
    fn views(&self, layer: usize, end: usize) -> Vec<PageView> {
        self.pages[layer]
            .iter()
            .filter(|p| p.start < end)
            .map(|p| {
                let filled = |t: &Tensor<3>| {
                    let [heads, len, dim] = t.dims();
                    t.clone().slice([0..heads, 0..len.min(end - p.start), 0..dim])
                };
                PageView { keys: filled(&p.keys), values: p.values.as_ref().map(filled), start: p.start }
            })
            .collect()
    }
}
