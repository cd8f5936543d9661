//! Opening `model.safetensors` or a sharded set described by `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;

use super::dtype::{SourceDtype, to_f32};
use crate::error::{FerryError, Result};

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8 + header length), in bytes.
    data_start: usize,
}

/// Where a tensor lives: its shard, dtype, shape and byte range inside the mapping.
#[derive(Debug, Clone)]
pub struct TensorRef {
    shard: usize,
    pub dtype: SourceDtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl TensorRef {
    /// Size of the tensor's data, in bytes.
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// All tensors of a model folder, memory-mapped, by name.
pub struct WeightStore {
    folder: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorRef>,
    /// Bytes handed out by `bytes` so far (loading, checking and uploading read every weight
    /// through it): what a progress display counts.
    read: AtomicU64,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightStore {
    /// Opens the weights of a HuggingFace model folder: the index of a sharded checkpoint if
    /// present, else `model.safetensors`.
    pub fn open(folder: &Path) -> Result<Self> {
        let index_path = folder.join("model.safetensors.index.json");
        let mut weight_map = None;
        let files: Vec<PathBuf> = if index_path.exists() {
            crate::error::regular_file(&index_path)?;
            let text = std::fs::read_to_string(&index_path).map_err(|e| FerryError::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| FerryError::Json { path: index_path.clone(), message: e.to_string() })?;
            check_index(&index_path, &index.weight_map)?;
            let mut names: Vec<String> = index.weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            weight_map = Some(index.weight_map);
            names.into_iter().map(|n| folder.join(n)).collect()
        } else {
            let single = folder.join("model.safetensors");
            if !single.exists() {
                return Err(FerryError::io(
                    &single,
                    "no weights: neither model.safetensors nor model.safetensors.index.json exists",
                ));
            }
            vec![single]
        };
        let store = Self::map(folder, files)?;
        if let Some(weight_map) = weight_map {
            store.check_index_entries(&index_path, &weight_map)?;
        }
        Ok(store)
    }

    /// Opens one safetensors file on its own (a predictor beside a model's weights).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::map(path.parent().unwrap_or(Path::new(".")), vec![path.to_path_buf()])
    }

    fn map(folder: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: HashMap<String, TensorRef> = HashMap::new();
        for (shard_idx, path) in files.into_iter().enumerate() {
            // A FIFO or device would block or fail inside the mapping with an unhelpful message.
            crate::error::regular_file(&path)?;
            let file = File::open(&path).map_err(|e| FerryError::io(&path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten while Ferry runs is outside
            // what any loader can defend against (the same holds for transformers' safe_open).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FerryError::io(&path, e))?;
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| FerryError::Safetensors { path: path.clone(), message: e.to_string() })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = SourceDtype::from_safetensors(info.dtype).ok_or_else(|| FerryError::Dtype {
                    name: name.clone(),
                    path: path.clone(),
                    found: info.dtype.to_string(),
                })?;
                let (start, end) = info.data_offsets;
                if let Some(first) = tensors.get(&name) {
                    let first: &Shard = &shards[first.shard];
                    return Err(FerryError::config(
                        &path,
                        format!("tensor {name:?} is also in {}; a tensor must be defined once", first.path.display()),
                    ));
                }
                tensors.insert(
                    name,
                    TensorRef {
                        shard: shard_idx,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                );
            }
            shards.push(Shard { path, mmap, data_start });
        }
        Ok(Self { folder: folder.to_path_buf(), shards, tensors, read: AtomicU64::new(0) })
    }

    /// Every index entry's shard holds its tensor (else the index and the shards disagree, and
    /// which copy a loader reads would be an accident).
    fn check_index_entries(&self, index_path: &Path, weight_map: &BTreeMap<String, String>) -> Result<()> {
        for (name, file) in weight_map {
            let holds = self.tensors.get(name).is_some_and(|t| self.shards[t.shard].path == self.folder.join(file));
            if !holds {
                return Err(FerryError::config(
                    index_path,
                    format!("weight_map puts tensor {name:?} in {file}, which does not hold it"),
                ));
            }
        }
        Ok(())
    }

    pub fn folder(&self) -> &Path {
        &self.folder
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's location, dtype and shape, without a shape check.
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Looks a tensor up and checks its shape against what the config implies.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<&TensorRef> {
        let tensor = self.tensors.get(name).ok_or_else(|| FerryError::MissingTensor {
            name: name.to_string(),
            folder: self.folder.clone(),
            files: self.shard_names(),
        })?;
        if tensor.shape != expected_shape {
            return Err(FerryError::Shape {
                name: name.to_string(),
                path: self.shards[tensor.shard].path.clone(),
                found: tensor.shape.clone(),
                expected: expected_shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// The raw little-endian bytes of a tensor, straight from the mapping.
    pub fn bytes(&self, tensor: &TensorRef) -> &[u8] {
        self.read.fetch_add(tensor.byte_len() as u64, Ordering::Relaxed);
        &self.shards[tensor.shard].mmap[tensor.start..tensor.end]
    }

    /// Bytes of tensor data read so far (a tensor read twice counts twice).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// A tensor converted to f32, after checking its shape and that every value is finite (a
    /// NaN or Inf weight would only show up as NaN logits). Packed codes are not weights.
    pub fn f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let tensor = self.float(name, expected_shape)?;
        let values = to_f32(self.bytes(tensor), tensor.dtype);
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(FerryError::config(
                &self.shards[tensor.shard].path,
                format!("tensor {name:?} holds {} at element {at}; weights must be finite", values[at]),
            ));
        }
        Ok(values)
    }

    /// A tensor of raw `dtype` (U8 MXFP4 blocks and scales, U32 packed codes), after checking its
    /// shape and dtype.
    pub fn raw(&self, name: &str, expected_shape: &[usize], dtype: SourceDtype) -> Result<&TensorRef> {
        let tensor = self.get(name, expected_shape)?;
        if tensor.dtype != dtype {
            return Err(self.dtype_error(name, tensor, &format!("{dtype:?}")));
        }
        Ok(tensor)
    }

    /// A float tensor (F32, F16 or BF16), after checking its shape and dtype.
    pub fn float(&self, name: &str, expected_shape: &[usize]) -> Result<&TensorRef> {
        let tensor = self.get(name, expected_shape)?;
        if !tensor.dtype.is_float() {
            return Err(self.dtype_error(name, tensor, "a float dtype (F32, F16, BF16)"));
        }
        Ok(tensor)
    }

    fn dtype_error(&self, name: &str, tensor: &TensorRef, expected: &str) -> FerryError {
        FerryError::Config {
            path: self.shards[tensor.shard].path.clone(),
            message: format!("tensor {name:?} has dtype {:?}; expected {expected}", tensor.dtype),
        }
    }

    /// Total bytes of tensor data across shards.
    pub fn total_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.mmap.len() - s.data_start).sum()
    }

    fn shard_names(&self) -> String {
        self.shards
            .iter()
            .map(|s| s.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An index must name at least one tensor, and only files inside the model folder (a path with
/// `..`, a root or a prefix would read whatever file it names).
fn check_index(index_path: &Path, weight_map: &BTreeMap<String, String>) -> Result<()> {
    if weight_map.is_empty() {
        return Err(FerryError::config(index_path, "weight_map is empty: the index names no tensors"));
    }
    for (name, file) in weight_map {
        let inside =
            !file.is_empty() && Path::new(file).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(FerryError::config(
                index_path,
                format!("weight_map puts tensor {name:?} in {file:?}, which is not a file inside the model folder"),
            ));
        }
    }
    Ok(())
}
