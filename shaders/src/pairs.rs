//! bf16 matrices on the device, two weights per u32 word paired along the reduction (rows `2p`
//! and `2p + 1` of an `[in, out]` matrix in word `[p, out]`, the first in the low half): packing
//! f32 rows into pairs, and widening pairs back to f32 for burn's matmul (a prefill's cost; a
//! decode step reads the pairs as they are, `matvec::matvec_bf16`).
//!
//! wgpu has no bf16 type, and burn no u32 matrices it would concatenate, so a packed matrix
//! travels in an f32 tensor `[in / 2, out]` whose bits are the words. Copies keep the bits of
//! every finite weight (a word is a NaN pattern only when its high weight is not finite).

use burn::tensor::{DType, Tensor};
use burn_cubecl::tensor::CubeTensor;

use crate::bridge::{ShaderError, cube_float, from_cube};

/// The kernels, apart so that their `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// Rounds f32 bits to bf16 bits, to nearest even (what `half::bf16::from_f32` does for finite
    /// values; exact for a value a BF16 checkpoint holds).
    #[cube]
    fn round_bf16(bits: u32) -> u32 {
        (bits + 0x7FFFu32 + ((bits >> 16u32) & 1u32)) >> 16u32
    }

    /// `words[p, o] = bf16(w[2p, o]) | bf16(w[2p + 1, o]) << 16` for `w` `[in, out]` (contiguous).
    #[cube(launch)]
    pub(super) fn pack_kernel(w: &Tensor<f32>, words: &mut Tensor<u32>, outputs: u32) {
        let pos = ABSOLUTE_POS;
        if pos >= words.len() {
            terminate!();
        }
        let out = outputs as usize;
        let (p, o) = (pos / out, pos % out);
        let low = round_bf16(u32::reinterpret(w[2 * p * out + o]));
        let high = round_bf16(u32::reinterpret(w[(2 * p + 1) * out + o]));
        words[pos] = low | (high << 16u32);
    }

    /// `w[2p, o]` and `w[2p + 1, o]` widened from `words[p, o]`.
    #[cube(launch)]
    pub(super) fn unpack_kernel(words: &Tensor<u32>, w: &mut Tensor<f32>, outputs: u32) {
        let pos = ABSOLUTE_POS;
        if pos >= words.len() {
            terminate!();
        }
        let out = outputs as usize;
        let (p, o) = (pos / out, pos % out);
        let word = words[pos];
        w[2 * p * out + o] = f32::reinterpret(word << 16u32);
        w[(2 * p + 1) * out + o] = f32::reinterpret(word & 0xFFFF_0000u32);
    }
}

/// `w` `[in, out]` (f32, `in` even) packed into bf16 pairs, carried in an f32 tensor
/// `[in / 2, out]`.
pub fn pack(w: Tensor<2>) -> Result<Tensor<2>, ShaderError> {
    let [inputs, outputs] = w.dims();
    if !inputs.is_multiple_of(2) {
        return Err(ShaderError::Shape(format!("a bf16 matrix needs an even input size, not {inputs}")));
    }
    let wc = cube_float(w)?;
    let client = wc.client.clone();
    let words = burn_cubecl::ops::numeric::empty_device_dtype(
        client.clone(),
        wc.device.clone(),
        [inputs / 2, outputs].into(),
        DType::F32,
    );
    let n = inputs / 2 * outputs;
    let (count, dim) = crate::launches::elementwise(&client, n);
    kernel::pack_kernel::launch(
        &client,
        count,
        dim,
        burn_cubecl::kernel::into_contiguous(wc).into_tensor_arg(),
        words.clone().into_tensor_arg(),
        outputs as u32,
    );
    Ok(from_cube(words))
}

/// The f32 matrix `[in, out]` that packed pairs `[in / 2, out]` stand for.
pub fn unpack(words: &CubeTensor) -> Tensor<2> {
    let (pairs, outputs) = (words.meta.shape()[0], words.meta.shape()[1]);
    let client = words.client.clone();
    let w = burn_cubecl::ops::numeric::empty_device_dtype(
        client.clone(),
        words.device.clone(),
        [2 * pairs, outputs].into(),
        DType::F32,
    );
    let n = pairs * outputs;
    let (count, dim) = crate::launches::elementwise(&client, n);
    kernel::unpack_kernel::launch(
        &client,
        count,
        dim,
        words.clone().into_tensor_arg(),
        w.clone().into_tensor_arg(),
        outputs as u32,
    );
    from_cube(w)
}

/// `pack` on the host: `w` `[in, out]` row-major to words `[in / 2, out]`.
pub fn pack_reference(w: &[f32], outputs: usize) -> Vec<u32> {
    let half = |v: f32| u32::from(half::bf16::from_f32(v).to_bits());
    let rows: Vec<&[f32]> = w.chunks_exact(outputs).collect();
    rows.chunks_exact(2)
        .flat_map(|pair| (0..outputs).map(move |o| half(pair[0][o]) | (half(pair[1][o]) << 16)))
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use crate::bridge::try_cube_float;
    use crate::testing::{device, random};

    /// Packing rounds to nearest even as the host reference does (values that are bf16 already
    /// survive exactly, ties and the largest finite values included), and unpacking returns the
    /// bf16 values the words hold.
    #[test]
    fn pairs_pack_like_the_reference_and_unpack_to_their_values() {
        let device = &device();
        let (inputs, outputs) = (6, 5);
        let mut w = random(inputs * outputs, 3, 4.0);
        // A tie (rounds to even), a bf16 value, and the largest finite f32.
        w[0] = f32::from_bits(0x3F80_8000);
        w[1] = 1.5;
        w[2] = f32::MAX / 4.0;
        let packed =
            super::pack(Tensor::<2>::from_data(TensorData::new(w.clone(), [inputs, outputs]), device)).unwrap();
        assert_eq!(packed.dims(), [inputs / 2, outputs]);
        let words: Vec<u32> =
            packed.clone().into_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(words, super::pack_reference(&w, outputs));
        let back: Vec<f32> = super::unpack(&try_cube_float(packed).unwrap()).into_data().try_to_vec().unwrap();
        let want: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(back, want);
        assert!(super::pack(Tensor::<2>::zeros([3, 2], device)).is_err(), "an odd input size");
    }
}
