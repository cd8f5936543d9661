//! Source dtypes Ferry reads and their conversion to the f32 the graph computes in.

use half::{bf16, f16};

/// Element types accepted in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    F16,
    BF16,
    /// Raw bytes: MXFP4 blocks (two e2m1 codes each) and scales (biased exponents).
    U8,
    /// Packed codes of experts quantised by `ferry convert quantize`.
    U32,
}

impl SourceDtype {
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Self::F32),
            safetensors::Dtype::F16 => Some(Self::F16),
            safetensors::Dtype::BF16 => Some(Self::BF16),
            safetensors::Dtype::U8 => Some(Self::U8),
            safetensors::Dtype::U32 => Some(Self::U32),
            _ => None,
        }
    }

    /// Whether the values are floating-point weights (not packed codes).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// The safetensors dtype it came from.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::BF16 => safetensors::Dtype::BF16,
            Self::U8 => safetensors::Dtype::U8,
            Self::U32 => safetensors::Dtype::U32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8 => 1,
            Self::U32 => 4,
        }
    }
}

/// Converts little-endian raw bytes of `dtype` into f32 values. The byte slice may be unaligned
/// (safetensors offsets are not aligned to the element size), so elements are decoded one by one.
pub fn to_f32(bytes: &[u8], dtype: SourceDtype) -> Vec<f32> {
    match dtype {
        SourceDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        SourceDtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        SourceDtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        SourceDtype::U8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        SourceDtype::U32 => {
            bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bytes_decode_to_their_f32_values() {
        let values = [1.5f32, -2.25, 0.0, 65504.0];
        let f16_bytes: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        assert_eq!(to_f32(&f16_bytes, SourceDtype::F16), values);
        let bf16_bytes: Vec<u8> =
            [1.5f32, -2.25, 0.0, 3.0e38].iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let back = to_f32(&bf16_bytes, SourceDtype::BF16);
        assert_eq!(&back[..3], &[1.5, -2.25, 0.0]);
        assert!((back[3] - 3.0e38).abs() / 3.0e38 < 1e-2);
    }

    #[test]
    fn unaligned_f32_bytes_decode() {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&7.25f32.to_le_bytes());
        assert_eq!(to_f32(&bytes[1..], SourceDtype::F32), vec![7.25]);
    }
}
