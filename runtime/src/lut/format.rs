//! The lookup-table file (`mole_lut.bin`): what `ferry convert mole-to-lut` writes and MoLE
//! inference memory-maps.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"FERRYLUT"
//!      8     4  version (u32, 1)
//!     12     4  dtype (u32: 0 = f32, 1 = f16)
//!     16     4  vocab (u32): number of rows
//!     20     4  layers (u32): MoLE layers, in model order
//!     24     4  experts (u32): lookup experts per layer
//!     28     4  d_model (u32): hidden size
//!     32    32  reserved, zero
//!     64     -  vocab rows
//! ```
//!
//! Row `i` starts at `64 + i * row_bytes` and holds `v[l][j][i]` = lookup expert `j` of MoLE
//! layer `l` applied to token `i`'s embedding, ordered `[layers][experts][d_model]`
//! (`row_bytes = layers * experts * d_model * dtype size`). All of one token's values are one
//! contiguous read, as in the paper's released code, and one layer's experts are contiguous
//! inside it.

use std::path::Path;

use half::f16;

use crate::error::{FerryError, Result};

/// File name of the table inside a model folder.
pub const LUT_FILE: &str = "mole_lut.bin";
pub const MAGIC: [u8; 8] = *b"FERRYLUT";
pub const VERSION: u32 = 1;
/// Bytes before the first row.
pub const HEADER_BYTES: usize = 64;

/// Element type of the stored rows (`convert mole-to-lut --dtype`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "kebab-case")]
pub enum LutDtype {
    F32,
    F16,
}

impl LutDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
        }
    }

    /// Encodes f32 values as little-endian bytes of this dtype.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes little-endian bytes of this dtype, appending f32 values to `out`.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Self::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Self::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        }
    }
}

/// The table's dimensions, as stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LutHeader {
    pub dtype: LutDtype,
    pub vocab: usize,
    pub layers: usize,
    pub experts: usize,
    pub d_model: usize,
}

impl LutHeader {
    /// Values in one token's row.
    pub fn row_len(&self) -> usize {
        self.layers * self.experts * self.d_model
    }

    /// Bytes of one token's row on disk.
    pub fn row_bytes(&self) -> usize {
        self.row_len() * self.dtype.size()
    }

    /// Size the whole file must have, in bytes.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.vocab as u64 * self.row_bytes() as u64
    }

    pub fn encode(&self) -> Result<[u8; HEADER_BYTES]> {
        let mut out = [0u8; HEADER_BYTES];
        out[..8].copy_from_slice(&MAGIC);
        let fields =
            [VERSION as usize, self.dtype.code() as usize, self.vocab, self.layers, self.experts, self.d_model];
        for (i, value) in fields.into_iter().enumerate() {
            let value = u32::try_from(value)
                .map_err(|_| FerryError::flag("mole-to-lut", format!("table dimension {value} does not fit in u32")))?;
            out[8 + 4 * i..12 + 4 * i].copy_from_slice(&value.to_le_bytes());
        }
        Ok(out)
    }

    /// Parses and checks the header of the file at `path` (whose first bytes are `bytes`).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |message: String| FerryError::LookupTable { path: path.to_path_buf(), message };
        if bytes.len() < HEADER_BYTES {
            return Err(bad(format!("truncated: {} bytes, shorter than the {HEADER_BYTES}-byte header", bytes.len())));
        }
        if bytes[..8] != MAGIC {
            return Err(bad("not a Ferry lookup table (magic is not FERRYLUT)".into()));
        }
        let field =
            |i: usize| u32::from_le_bytes([bytes[8 + 4 * i], bytes[9 + 4 * i], bytes[10 + 4 * i], bytes[11 + 4 * i]]);
        if field(0) != VERSION {
            return Err(bad(format!("format version {} is not supported (this Ferry reads {VERSION})", field(0))));
        }
        let dtype = match field(1) {
            0 => LutDtype::F32,
            1 => LutDtype::F16,
            other => return Err(bad(format!("unknown dtype code {other}"))),
        };
        let header = Self {
            dtype,
            vocab: field(2) as usize,
            layers: field(3) as usize,
            experts: field(4) as usize,
            d_model: field(5) as usize,
        };
        if bytes.len() as u64 != header.file_bytes() {
            return Err(bad(format!(
                "{} bytes, but its header ({} rows of {} bytes) needs {} (truncated or corrupt?)",
                bytes.len(),
                header.vocab,
                header.row_bytes(),
                header.file_bytes()
            )));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checks_the_file_length() {
        let h = LutHeader { dtype: LutDtype::F16, vocab: 3, layers: 2, experts: 4, d_model: 8 };
        let mut file = h.encode().unwrap().to_vec();
        file.resize(h.file_bytes() as usize, 0);
        assert_eq!(LutHeader::decode(Path::new("t.bin"), &file).unwrap(), h);
        file.pop();
        let err = LutHeader::decode(Path::new("t.bin"), &file).unwrap_err().to_string();
        assert!(err.contains("t.bin") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn f16_rows_decode_to_the_rounded_values() {
        let mut bytes = Vec::new();
        LutDtype::F16.encode(&[1.0, -0.5, 1e-3], &mut bytes);
        let mut out = Vec::new();
        LutDtype::F16.decode(&bytes, &mut out);
        assert_eq!(out, vec![1.0, -0.5, f16::from_f32(1e-3).to_f32()]);
    }
}
