//! Host side of the expert manager: where each routed expert's bytes live in the memory-mapped
//! checkpoint. Nothing is copied until an expert is uploaded.
//!
//! Three checkpoint layouts are read (`ExpertLayout`): one matrix per expert and projection,
//! GPT-OSS's fused per-layer tensors, and the same in MXFP4. Each expert is handed out as f32
//! in checkpoint layout (gate, up `[inter, hidden]`, down `[hidden, inter]`), or quantised in slot
//! layout; an MXFP4 checkpoint uploaded as MXFP4 is repacked without passing through f32.

use std::sync::{Arc, OnceLock};

use ferry_shaders::expert::pack_bf16;
use ferry_shaders::format::{GROUP, QuantMatrix, code_rows, e2m1_twice, pow2};

use super::host::{HostExpertView, HostMatrix};
use super::quant::QuantExpert;
use crate::error::{FerryError, Result};
use crate::options::ExpertDtype;
use crate::spec::{ExpertLayout, FfnKind, ModelSpec};
use crate::weights::SourceDtype::{BF16, F16, F32, U8, U32};
use crate::weights::{SourceDtype, TensorRef, WeightStore, to_f32};

/// An expert in host memory, ready to upload: f32 in checkpoint layout, bf16 words in
/// checkpoint layout (each row's neighbours paired), or quantised in slot layout.
#[derive(Debug, Clone)]
pub enum HostExpert {
    F32([Vec<f32>; 3]),
    Bf16([Vec<u32>; 3]),
    Quant(Arc<QuantExpert>),
}

impl HostExpert {
    /// Gate, up and down as the bytes a slot holds (f32, or bf16 words); None when quantised.
    pub fn parts(&self) -> Option<[&[u8]; 3]> {
        match self {
            Self::F32(w) => Some(w.each_ref().map(|v| bytemuck::cast_slice(v))),
            Self::Bf16(w) => Some(w.each_ref().map(|v| bytemuck::cast_slice(v))),
            Self::Quant(_) => None,
        }
    }
}

/// An expert's weights for the host kernel: borrowed from the mapping, or the upload form.
pub enum HostSource<'a> {
    /// Gate, up and down as the checkpoint stores them (F32, BF16 or F16), aligned.
    Mapped([&'a [u8]; 3], SourceDtype),
    Owned(HostExpert),
}

impl HostSource<'_> {
    /// The matrices as the host kernel reads them; `dtype` is the slot format they stand for.
    pub fn view(&self, dtype: ExpertDtype) -> HostExpertView<'_> {
        let [gate, up, down] = match self {
            Self::Mapped(bytes, F32) => bytes.map(|b| HostMatrix::F32(bytemuck::cast_slice(b))),
            Self::Mapped(bytes, F16) => bytes.map(|b| HostMatrix::F16(bytemuck::cast_slice(b))),
            Self::Mapped(bytes, _) => bytes.map(|b| HostMatrix::Bf16(bytemuck::cast_slice(b))),
            Self::Owned(HostExpert::F32(w)) if dtype == ExpertDtype::F16 => {
                w.each_ref().map(|m| HostMatrix::F32AsF16(m))
            }
            Self::Owned(HostExpert::F32(w)) => w.each_ref().map(|m| HostMatrix::F32(m)),
            Self::Owned(HostExpert::Bf16(w)) => w.each_ref().map(|m| HostMatrix::Bf16(bytemuck::cast_slice(m))),
            Self::Owned(HostExpert::Quant(q)) => {
                let (bits, fp4) = (q.dtype.bits().unwrap_or(8), q.dtype.fp4());
                [&q.gate, &q.up, &q.down].map(|matrix| HostMatrix::Quant { matrix, bits, fp4 })
            }
        };
        HostExpertView { gate, up, down }
    }

    /// Bytes the host kernel reads.
    pub fn bytes(&self) -> u64 {
        let len = |v: usize, size: usize| (v * size) as u64;
        match self {
            Self::Mapped(bytes, _) => bytes.iter().map(|b| b.len() as u64).sum(),
            Self::Owned(HostExpert::F32(w)) => w.iter().map(|m| len(m.len(), 4)).sum(),
            Self::Owned(HostExpert::Bf16(w)) => w.iter().map(|m| len(m.len(), 4)).sum(),
            Self::Owned(HostExpert::Quant(q)) => {
                [&q.gate, &q.up, &q.down].iter().map(|m| len(m.words.len(), 4) + len(m.scales.len(), 4)).sum()
            }
        }
    }
}

/// Where one layer's routed experts live.
enum LayerSource {
    /// Gate, up and down per expert.
    PerExpert(Vec<[TensorRef; 3]>),
    /// `gate_up` `[experts, hidden, 2 * inter]` (x @ W; gate even columns, up odd) and `down`
    /// `[experts, inter, hidden]`.
    Fused { gate_up: TensorRef, down: TensorRef },
    /// MXFP4 blocks `[experts, out, in / 32, 16]` and scales `[experts, out, in / 32]`: gate_up's
    /// outputs interleave gate and up rows; down's outputs are hidden rows.
    Mxfp4 { gate_up: [TensorRef; 2], down: [TensorRef; 2] },
    /// `ferry convert quantize`'s slot-layout codes and scales per projection (gate, up, down).
    Prequantised { dtype: ExpertDtype, codes: [TensorRef; 3], scales: [TensorRef; 3] },
}

/// Tensor names of a pre-quantised layer's projection `part` (gate, up, down) relative to the
/// layer: `ferry_experts.{part}.codes` and `.scales`.
pub fn prequantised_names(part: &str) -> [String; 2] {
    [format!("ferry_experts.{part}.codes"), format!("ferry_experts.{part}.scales")]
}

/// Every routed expert's gate, up and down weights, by (layer, expert).
pub struct ExpertStore {
    weights: Arc<WeightStore>,
    /// `layers[layer]`; None for dense layers.
    layers: Vec<Option<LayerSource>>,
    num_experts: usize,
    hidden: usize,
    intermediate: usize,
    dtype: ExpertDtype,
    /// Quantised experts, made on first use and kept in host RAM (`[layer][expert]`).
    quantised: Vec<Vec<OnceLock<Arc<QuantExpert>>>>,
}

impl ExpertStore {
    /// Looks up and shape-checks every expert tensor, so a bad checkpoint fails at load time
    /// rather than at its first miss.
    pub fn new(weights: Arc<WeightStore>, spec: &ModelSpec, dtype: ExpertDtype) -> Result<Self> {
        let (h, i, e) = (spec.hidden_size, spec.moe.expert_intermediate_size, spec.moe.num_experts);
        if spec.layers.contains(&FfnKind::Moe) {
            dtype.check(h, i)?;
        }
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(layer, kind)| match kind {
                FfnKind::Dense { .. } | FfnKind::Mole => Ok(None),
                FfnKind::Moe => layer_source(&weights, spec, layer).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let quantised =
            layers.iter().map(|l| (0..if l.is_some() { e } else { 0 }).map(|_| OnceLock::new()).collect()).collect();
        Ok(Self { weights, layers, num_experts: e, hidden: h, intermediate: i, dtype, quantised })
    }

    /// The format experts are uploaded in.
    pub fn dtype(&self) -> ExpertDtype {
        self.dtype
    }

    /// Bytes of one expert in its GPU slot (and on the link).
    pub fn slot_bytes(&self) -> u64 {
        self.dtype.expert_bytes(self.hidden, self.intermediate)
    }

    /// The expert as it is uploaded: f32 converted from the checkpoint, or quantised (once, then
    /// kept in host RAM).
    pub fn host(&self, layer: usize, expert: usize) -> HostExpert {
        if self.dtype == ExpertDtype::Bf16 {
            return HostExpert::Bf16(self.host_bf16(layer, expert));
        }
        if self.dtype.bits().is_none() {
            return HostExpert::F32(self.host_f32(layer, expert));
        }
        HostExpert::Quant(Arc::clone(self.quantised[layer][expert].get_or_init(|| {
            Arc::new(match (&self.layers[layer], self.dtype) {
                (Some(LayerSource::Mxfp4 { gate_up, down }), ExpertDtype::Mxfp4) => {
                    self.mxfp4_slots(gate_up, down, expert)
                }
                _ => QuantExpert::new(&self.host_f32(layer, expert), self.hidden, self.intermediate, self.dtype),
            })
        })))
    }

    /// The expert as the host kernel reads it: the mapped checkpoint bytes where they already
    /// hold what the slots would (f32 slots over an F32, BF16 or F16 checkpoint; bf16 slots over
    /// BF16; f16 slots over F16), else the form it would be uploaded in.
    pub fn host_source(&self, layer: usize, expert: usize) -> HostSource<'_> {
        match self.mapped(layer, expert) {
            Some((bytes, dtype)) => HostSource::Mapped(bytes, dtype),
            None => HostSource::Owned(self.host(layer, expert)),
        }
    }

    /// The checkpoint's bytes of the expert where they are exactly what its slot holds (f32
    /// slots over F32, bf16 slots over BF16): an upload copies them from the mapping into a
    /// staging buffer with no host conversion.
    pub fn upload_bytes(&self, layer: usize, expert: usize) -> Option<[&[u8]; 3]> {
        match (self.mapped(layer, expert)?, self.dtype) {
            ((bytes, F32), ExpertDtype::F32) | ((bytes, BF16), ExpertDtype::Bf16) => Some(bytes),
            _ => None,
        }
    }

    /// The mapped bytes of a per-expert checkpoint where the host kernel can read them as the
    /// slots' values (see `host_source`), with their stored type.
    fn mapped(&self, layer: usize, expert: usize) -> Option<([&[u8]; 3], SourceDtype)> {
        let Some(LayerSource::PerExpert(experts)) = &self.layers[layer] else { return None };
        let tensors = &experts[expert];
        let dtype = tensors[0].dtype;
        let same = tensors.iter().all(|t| t.dtype == dtype);
        let exact = matches!(
            (self.dtype, dtype),
            (ExpertDtype::F32, F32 | BF16 | F16) | (ExpertDtype::Bf16, BF16) | (ExpertDtype::F16, F16)
        );
        if !(same && exact) {
            return None;
        }
        let bytes = tensors.each_ref().map(|t| self.weights.bytes(t));
        // A tensor at an offset its element type cannot be read from is converted instead.
        let aligned = match dtype {
            F32 => bytes.iter().all(|b| bytemuck::try_cast_slice::<u8, f32>(b).is_ok()),
            _ => bytes.iter().all(|b| bytemuck::try_cast_slice::<u8, u16>(b).is_ok()),
        };
        aligned.then_some((bytes, dtype))
    }

    /// The expert in this store's quantised format, made now (not kept): repacked without
    /// passing through f32 when the checkpoint already holds that format.
    pub fn quantised(&self, layer: usize, expert: usize) -> QuantExpert {
        match (&self.layers[layer], self.dtype) {
            (Some(LayerSource::Mxfp4 { gate_up, down }), ExpertDtype::Mxfp4) => self.mxfp4_slots(gate_up, down, expert),
            (Some(LayerSource::Prequantised { dtype, codes, scales }), wanted) if *dtype == wanted => {
                self.stored(*dtype, codes, scales, expert)
            }
            _ => QuantExpert::new(&self.host_f32(layer, expert), self.hidden, self.intermediate, self.dtype),
        }
    }

    /// `(intermediate, hidden)`: gate and up are `[intermediate, hidden]`, down the transpose.
    pub fn dims(&self) -> (usize, usize) {
        (self.intermediate, self.hidden)
    }

    pub fn num_experts(&self, layer: usize) -> usize {
        if self.layers.get(layer).is_some_and(Option::is_some) { self.num_experts } else { 0 }
    }

    /// Layers that have routed experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(l, _)| l)
    }

    /// The expert's gate, up and down weights as f32 in checkpoint layout.
    pub fn host_f32(&self, layer: usize, expert: usize) -> [Vec<f32>; 3] {
        let (h, i) = (self.hidden, self.intermediate);
        match self.layers[layer].as_ref().expect("experts of a MoE layer") {
            LayerSource::PerExpert(experts) => {
                experts[expert].each_ref().map(|t| to_f32(self.weights.bytes(t), t.dtype))
            }
            LayerSource::Fused { gate_up, down } => {
                let gu = to_f32(self.slice(gate_up, expert), gate_up.dtype); // [h, 2i]
                let d = to_f32(self.slice(down, expert), down.dtype); // [i, h]
                let gate = (0..i).flat_map(|r| (0..h).map(move |c| (r, c))).map(|(r, c)| gu[c * 2 * i + 2 * r]);
                let up = (0..i).flat_map(|r| (0..h).map(move |c| (r, c))).map(|(r, c)| gu[c * 2 * i + 2 * r + 1]);
                let down = (0..h).flat_map(|r| (0..i).map(move |c| (r, c))).map(|(r, c)| d[c * h + r]);
                [gate.collect(), up.collect(), down.collect()]
            }
            LayerSource::Mxfp4 { gate_up, down } => {
                let gu = mxfp4_rows(self.slice(&gate_up[0], expert), self.slice(&gate_up[1], expert), h);
                let rows =
                    |parity: usize| (0..i).flat_map(|r| gu[(2 * r + parity) * h..][..h].iter().copied()).collect();
                let down = mxfp4_rows(self.slice(&down[0], expert), self.slice(&down[1], expert), i);
                [rows(0), rows(1), down]
            }
            LayerSource::Prequantised { dtype, codes, scales } => {
                self.stored(*dtype, codes, scales, expert).dequantize(h, i)
            }
        }
    }

    /// The expert's gate, up and down as bf16 words in checkpoint layout: a BF16 checkpoint's
    /// mapped bytes as they are (no conversion), anything else rounded from f32.
    pub fn host_bf16(&self, layer: usize, expert: usize) -> [Vec<u32>; 3] {
        if let Some(LayerSource::PerExpert(experts)) = &self.layers[layer]
            && experts[expert].iter().all(|t| t.dtype == BF16)
        {
            return experts[expert].each_ref().map(|t| words(self.weights.bytes(t)));
        }
        self.host_f32(layer, expert).map(|w| pack_bf16(&w))
    }

    /// A pre-quantised expert read from the mapping.
    fn stored(
        &self,
        dtype: ExpertDtype,
        codes: &[TensorRef; 3],
        scales: &[TensorRef; 3],
        expert: usize,
    ) -> QuantExpert {
        let matrix = |k: usize| QuantMatrix {
            words: words(self.slice(&codes[k], expert)),
            scales: to_f32(self.slice(&scales[k], expert), scales[k].dtype),
        };
        QuantExpert { dtype, gate: matrix(0), up: matrix(1), down: matrix(2) }
    }

    /// Bytes the expert occupies in the checkpoint.
    pub fn source_bytes(&self, layer: usize, expert: usize) -> usize {
        let share = |t: &TensorRef| t.byte_len() / self.num_experts;
        match self.layers[layer].as_ref().expect("experts of a MoE layer") {
            LayerSource::PerExpert(experts) => experts[expert].iter().map(TensorRef::byte_len).sum(),
            LayerSource::Fused { gate_up, down } => share(gate_up) + share(down),
            LayerSource::Mxfp4 { gate_up, down } => gate_up.iter().chain(down).map(share).sum(),
            LayerSource::Prequantised { codes, scales, .. } => codes.iter().chain(scales).map(share).sum(),
        }
    }

    /// One expert's part of a per-layer tensor whose first dimension is the expert.
    fn slice(&self, t: &TensorRef, expert: usize) -> &[u8] {
        let per = t.byte_len() / self.num_experts;
        &self.weights.bytes(t)[expert * per..(expert + 1) * per]
    }

    /// An MXFP4 expert repacked into slot layout: each slot word is four consecutive block
    /// bytes (eight codes along the reduction, the first in the lowest bits), and each block
    /// scale `2^(s - 127)` is stored as f32 halved, since the kernel decodes codes to twice their
    /// value. Exact.
    fn mxfp4_slots(&self, gate_up: &[TensorRef; 2], down: &[TensorRef; 2], expert: usize) -> QuantExpert {
        let (h, i) = (self.hidden, self.intermediate);
        let (gu_blocks, gu_scales) = (self.slice(&gate_up[0], expert), self.slice(&gate_up[1], expert));
        let (d_blocks, d_scales) = (self.slice(&down[0], expert), self.slice(&down[1], expert));
        QuantExpert {
            dtype: ExpertDtype::Mxfp4,
            gate: repack(gu_blocks, gu_scales, (0..i).map(|r| 2 * r), h),
            up: repack(gu_blocks, gu_scales, (0..i).map(|r| 2 * r + 1), h),
            down: repack(d_blocks, d_scales, 0..h, i),
        }
    }
}

/// The format a checkpoint stores its routed experts in, as the slot format that keeps them
/// exactly at their stored width (`--expert-dtype auto`): BF16 -> bf16, MXFP4 -> mxfp4, a
/// `convert quantize` folder -> its format; F32 and F16 -> f32 (f16 slots need `shader-f16`,
/// which not every adapter has; `--expert-dtype f16` is exact for F16 checkpoints). None for a
/// model without routed experts.
pub fn stored_expert_dtype(weights: &WeightStore, spec: &ModelSpec) -> Result<Option<ExpertDtype>> {
    let Some(layer) = spec.layers.iter().position(|k| *k == FfnKind::Moe) else { return Ok(None) };
    let dtype = match layer_source(weights, spec, layer)? {
        LayerSource::PerExpert(experts) if experts.iter().flatten().all(|t| t.dtype == BF16) => ExpertDtype::Bf16,
        LayerSource::Fused { gate_up, down } if gate_up.dtype == BF16 && down.dtype == BF16 => ExpertDtype::Bf16,
        LayerSource::Mxfp4 { .. } => ExpertDtype::Mxfp4,
        LayerSource::Prequantised { dtype, .. } => dtype,
        LayerSource::PerExpert(_) | LayerSource::Fused { .. } => ExpertDtype::F32,
    };
    Ok(Some(dtype))
}

fn layer_source(weights: &WeightStore, spec: &ModelSpec, layer: usize) -> Result<LayerSource> {
    let (h, i, e) = (spec.hidden_size, spec.moe.expert_intermediate_size, spec.moe.num_experts);
    let prefix = spec.names.layer(layer, &spec.names.fused_experts);
    match spec.moe.layout {
        ExpertLayout::PerExpert => {
            let shapes = [[i, h], [i, h], [h, i]];
            (0..e)
                .map(|expert| {
                    let names = spec.names.expert_weights(layer, expert);
                    let get = |k: usize| weights.float(&names[k], &shapes[k]).cloned();
                    Ok([get(0)?, get(1)?, get(2)?])
                })
                .collect::<Result<Vec<_>>>()
                .map(LayerSource::PerExpert)
        }
        ExpertLayout::Fused => Ok(LayerSource::Fused {
            gate_up: weights.float(&format!("{prefix}.gate_up_proj"), &[e, h, 2 * i])?.clone(),
            down: weights.float(&format!("{prefix}.down_proj"), &[e, i, h])?.clone(),
        }),
        ExpertLayout::Mxfp4 => {
            for (what, k) in [("hidden_size", h), ("intermediate_size", i)] {
                if !k.is_multiple_of(GROUP) {
                    return Err(FerryError::config(
                        weights.folder().join("config.json"),
                        format!("MXFP4 experts need {what} ({k}) divisible by the block size {GROUP}"),
                    ));
                }
            }
            let pair = |name: &str, out: usize, k: usize| -> Result<[TensorRef; 2]> {
                let blocks =
                    weights.raw(&format!("{prefix}.{name}_blocks"), &[e, out, k / GROUP, GROUP / 2], U8)?.clone();
                let scales_name = format!("{prefix}.{name}_scales");
                let scales = weights.tensor(&scales_name).cloned();
                // The scales must cover the blocks one for one: name the pair when they do not.
                match scales {
                    Some(s) if s.shape == blocks.shape[..3] && s.dtype == blocks.dtype => Ok([blocks, s]),
                    Some(s) => Err(FerryError::config(
                        weights.folder(),
                        format!(
                            "MXFP4 tensor {scales_name:?} ({:?} {:?}) does not match its blocks {name}_blocks {:?} \
                             (expected U8 {:?})",
                            s.dtype,
                            s.shape,
                            blocks.shape,
                            &blocks.shape[..3]
                        ),
                    )),
                    None => weights.raw(&scales_name, &blocks.shape[..3], U8).map(|s| [blocks, s.clone()]),
                }
            };
            Ok(LayerSource::Mxfp4 { gate_up: pair("gate_up_proj", 2 * i, h)?, down: pair("down_proj", h, i)? })
        }
        ExpertLayout::Prequantised(stored) => {
            let bits = stored.bits().unwrap_or(32);
            // (k, n) per projection: gate and up reduce over hidden, down over intermediate.
            let dims = [(h, i), (h, i), (i, h)];
            let get = |p: usize, part: &str| -> Result<[TensorRef; 2]> {
                let [codes, scales] = prequantised_names(part).map(|n| spec.names.layer(layer, &n));
                let (k, n) = dims[p];
                Ok([
                    weights.raw(&codes, &[e, code_rows(k, bits), n], U32)?.clone(),
                    weights.raw(&scales, &[e, k / GROUP, n], F32)?.clone(),
                ])
            };
            let [gate, up, down] = [get(0, "gate")?, get(1, "up")?, get(2, "down")?];
            Ok(LayerSource::Prequantised {
                dtype: stored,
                codes: [gate[0].clone(), up[0].clone(), down[0].clone()],
                scales: [gate[1].clone(), up[1].clone(), down[1].clone()],
            })
        }
    }
}

/// Dequantised MXFP4 rows `[out, k]` from blocks `[out, k / 32, 16]` and scales `[out, k / 32]`.
fn mxfp4_rows(blocks: &[u8], scales: &[u8], k: usize) -> Vec<f32> {
    let groups = k / GROUP;
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (g, block) in blocks.chunks_exact(GROUP / 2).enumerate() {
        let scale = pow2(i32::from(scales[g]) - 128); // half the block scale: codes decode doubled
        for &byte in block {
            out.push(e2m1_twice(u32::from(byte & 0x0f)) as f32 * scale);
            out.push(e2m1_twice(u32::from(byte >> 4)) as f32 * scale);
        }
    }
    debug_assert_eq!(out.len(), scales.len() / groups.max(1) * k);
    out
}

/// The slot-layout matrix over the reduction `k` whose columns are the given block rows.
fn repack(blocks: &[u8], scales: &[u8], rows: impl Iterator<Item = usize> + Clone, k: usize) -> QuantMatrix {
    let n = rows.clone().count();
    let (row_bytes, groups) = (k / 2, k / GROUP);
    let mut words = vec![0u32; k / 8 * n];
    let mut slot_scales = vec![0f32; groups * n];
    for (column, row) in rows.enumerate() {
        let bytes = &blocks[row * row_bytes..][..row_bytes];
        for (w, chunk) in bytes.chunks_exact(4).enumerate() {
            words[w * n + column] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        for g in 0..groups {
            slot_scales[g * n + column] = pow2(i32::from(scales[row * groups + g]) - 128);
        }
    }
    QuantMatrix { words, scales: slot_scales }
}

/// Little-endian bytes as u32 words (mapped bytes need not be 4-byte aligned).
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_shaders::format::dequantize;

    /// Repacking an MXFP4 block row into slot words decodes to the same values as dequantising
    /// the row directly.
    #[test]
    fn repacked_mxfp4_rows_equal_directly_dequantised_rows() {
        let k = 64;
        let rows = 3;
        let blocks: Vec<u8> = (0..rows * k / 2).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..rows * k / GROUP).map(|i| 120 + (i * 3 % 9) as u8).collect();
        let direct = mxfp4_rows(&blocks, &scales, k);
        let packed = repack(&blocks, &scales, 0..rows, k);
        assert_eq!(dequantize(&packed, rows, k, 4, true), direct);
        // Low nibble first: byte 0x21 is codes 1 (0.5) then 2 (1.0), times 2^(s - 127).
        let one = mxfp4_rows(&[0x21; 16], &[127], 32);
        assert_eq!(&one[..2], &[0.5, 1.0]);
    }
}
