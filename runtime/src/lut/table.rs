//! A memory-mapped lookup table: per token, its one row is read (from Ferry's row cache, else
//! from the mapping, i.e. the OS page cache or the disk) and handed to the graph as f32.

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Add, Sub};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::format::{HEADER_BYTES, LutHeader};
use crate::error::{FerryError, Result};

/// Cumulative lookup counters; subtract two snapshots for one step's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LookupStats {
    /// Token rows the forward passes needed (one per token per pass).
    pub rows_fetched: u64,
    /// Of those, rows served by Ferry's row cache (`--lut-cache`).
    pub row_cache_hits: u64,
    /// Bytes read from the memory-mapped table file (served by the OS page cache or the disk).
    pub bytes_read: u64,
    /// Bytes uploaded to the GPU (rows as f32).
    pub bytes_uploaded: u64,
}

impl Add for LookupStats {
    type Output = Self;

    fn add(self, rhs: Self) -> Self {
        Self {
            rows_fetched: self.rows_fetched + rhs.rows_fetched,
            row_cache_hits: self.row_cache_hits + rhs.row_cache_hits,
            bytes_read: self.bytes_read + rhs.bytes_read,
            bytes_uploaded: self.bytes_uploaded + rhs.bytes_uploaded,
        }
    }
}

impl Sub for LookupStats {
    type Output = Self;

    fn sub(self, rhs: Self) -> Self {
        Self {
            rows_fetched: self.rows_fetched - rhs.rows_fetched,
            row_cache_hits: self.row_cache_hits - rhs.row_cache_hits,
            bytes_read: self.bytes_read - rhs.bytes_read,
            bytes_uploaded: self.bytes_uploaded - rhs.bytes_uploaded,
        }
    }
}

/// Decoded rows kept in host memory, least recently used evicted first.
struct RowCache {
    capacity_bytes: u64,
    row_bytes: u64,
    rows: HashMap<u32, (Vec<f32>, u64)>,
    clock: u64,
}

impl RowCache {
    fn get(&mut self, id: u32) -> Option<&[f32]> {
        self.clock += 1;
        let clock = self.clock;
        self.rows.get_mut(&id).map(|(row, used)| {
            *used = clock;
            row.as_slice()
        })
    }

    fn insert(&mut self, id: u32, row: Vec<f32>) {
        if self.row_bytes == 0 || self.capacity_bytes < self.row_bytes {
            return;
        }
        while (self.rows.len() as u64 + 1) * self.row_bytes > self.capacity_bytes {
            let oldest = self.rows.iter().min_by_key(|(_, (_, used))| *used).map(|(&id, _)| id);
            match oldest {
                Some(old) => self.rows.remove(&old),
                None => break,
            };
        }
        self.rows.insert(id, (row, self.clock));
    }
}

/// One MoLE model's lookup table, memory-mapped.
pub struct LookupTable {
    path: PathBuf,
    mmap: Mmap,
    header: LutHeader,
    cache: RowCache,
    stats: LookupStats,
}

impl LookupTable {
    /// Maps the table at `path` and checks its header against what the model's config implies
    /// (`expected`'s dtype is not checked: either is accepted).
    pub fn open(path: &Path, expected: &LutHeader) -> Result<Self> {
        crate::error::regular_file(path)?;
        let file = File::open(path).map_err(|e| FerryError::io(path, e))?;
        // SAFETY: read-only mapping; a table rewritten while Ferry runs is outside what a loader
        // can defend against (as for the safetensors shards).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FerryError::io(path, e))?;
        let header = LutHeader::decode(path, &mmap)?;
        let found = (header.vocab, header.layers, header.experts, header.d_model);
        let wanted = (expected.vocab, expected.layers, expected.experts, expected.d_model);
        if found != wanted {
            return Err(FerryError::LookupTable {
                path: path.to_path_buf(),
                message: format!(
                    "header (vocab, layers, experts, d_model) = {found:?} does not match config.json's {wanted:?}; re-run ferry convert mole-to-lut"
                ),
            });
        }
        let row_bytes = (header.row_len() * 4) as u64;
        let cache = RowCache { capacity_bytes: 0, row_bytes, rows: HashMap::new(), clock: 0 };
        Ok(Self { path: path.to_path_buf(), mmap, header, cache, stats: LookupStats::default() })
    }

    pub fn header(&self) -> &LutHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the row cache's size in bytes of decoded (f32) rows; 0 disables it.
    pub fn set_cache_bytes(&mut self, bytes: u64) {
        self.cache.capacity_bytes = bytes;
        self.cache.rows.clear();
    }

    pub fn stats(&self) -> LookupStats {
        self.stats
    }

    /// The rows of `ids`, one after another as f32 (`ids.len() * row_len` values), counted as
    /// uploaded since the caller puts them on the GPU.
    pub fn rows(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let row_len = self.header.row_len();
        let mut out = Vec::with_capacity(ids.len() * row_len);
        for &id in ids {
            let i = id as usize;
            if i >= self.header.vocab {
                return Err(FerryError::TokenOutOfRange { id, vocab: self.header.vocab });
            }
            self.stats.rows_fetched += 1;
            self.stats.bytes_uploaded += (row_len * 4) as u64;
            if let Some(row) = self.cache.get(id) {
                out.extend_from_slice(row);
                self.stats.row_cache_hits += 1;
                continue;
            }
            let row_bytes = self.header.row_bytes();
            let start = HEADER_BYTES + i * row_bytes;
            let start_len = out.len();
            self.header.dtype.decode(&self.mmap[start..start + row_bytes], &mut out);
            self.stats.bytes_read += row_bytes as u64;
            if self.cache.capacity_bytes > 0 {
                self.cache.insert(id, out[start_len..].to_vec());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::RowCache;
    use std::collections::HashMap;

    #[test]
    fn row_cache_evicts_the_least_recently_used_row() {
        let mut c = RowCache { capacity_bytes: 8, row_bytes: 4, rows: HashMap::new(), clock: 0 };
        c.insert(1, vec![1.0]);
        c.get(1);
        c.insert(2, vec![2.0]);
        c.get(1);
        c.insert(3, vec![3.0]);
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(2).is_none());
    }
}
