//! Packed expert codes as the slot kernels read them: group-wise symmetric integer codes
//! (8, 4, 3 or 2 bits, one scale per `GROUP` weights along the dot product's dimension) and
//! MXFP4's e2m1 codes, packed into u32 words in the slot's own layout; quantisation on the way
//! in and dequantisation for references.

/// Weights sharing one scale, along the reduction dimension.
pub const GROUP: usize = 32;

/// Rows of u32 code words for `k` reduction rows of `bits`-bit codes (`k` whole groups).
pub fn code_rows(k: usize, bits: u32) -> usize {
    k * bits as usize / 32
}

/// Code `r` of `column`. Widths that divide 32 pack whole codes, the first in the lowest bits.
/// 3-bit codes would straddle words, so each group of 32 is kept in bit planes: two words of
/// low 2-bit parts (16 codes each), then one word of the 32 high bits.
pub fn get_code(words: &[u32], n: usize, column: usize, r: usize, bits: u32) -> u32 {
    if bits == 3 {
        let (q, b) = (r / GROUP, r % GROUP);
        let low = (words[(q * 3 + b / 16) * n + column] >> (2 * (b % 16))) & 3;
        let high = (words[(q * 3 + 2) * n + column] >> b) & 1;
        return low | high << 2;
    }
    let per_word = (32 / bits) as usize;
    (words[r / per_word * n + column] >> ((r % per_word) as u32 * bits)) & ((1 << bits) - 1)
}

/// Ors `code` into its place (see `get_code`); the words start zeroed.
pub fn put_code(words: &mut [u32], n: usize, column: usize, r: usize, bits: u32, code: u32) {
    if bits == 3 {
        let (q, b) = (r / GROUP, r % GROUP);
        words[(q * 3 + b / 16) * n + column] |= (code & 3) << (2 * (b % 16));
        words[(q * 3 + 2) * n + column] |= (code >> 2) << b;
        return;
    }
    let per_word = (32 / bits) as usize;
    words[r / per_word * n + column] |= code << ((r % per_word) as u32 * bits);
}

/// One matrix in slot layout: `k` reduction rows by `n` columns, codes packed along `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// `[code_rows(k, bits), n]`, packed as `get_code` reads them. An integer code is the
    /// signed value plus `2^(bits-1)`; an MXFP4 code is an e2m1 nibble (see `e2m1_twice`).
    pub words: Vec<u32>,
    /// `[k / GROUP, n]`.
    pub scales: Vec<f32>,
}

/// The largest magnitude of a group, NaN when any value is NaN (`f32::max` would skip it and
/// quantise the NaN to a plausible code; a NaN scale is caught by the non-finite checks).
fn absmax(group: &[f32]) -> f32 {
    group.iter().fold(0f32, |m, v| if v.is_nan() || m.is_nan() { f32::NAN } else { m.max(v.abs()) })
}

/// Quantises `w`, given in checkpoint layout `[n, k]` (one row per output, over the reduction
/// dimension), into slot layout.
pub fn quantize(w: &[f32], n: usize, k: usize, bits: u32) -> QuantMatrix {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let zero = 1i32 << (bits - 1);
    let mut words = vec![0u32; code_rows(k, bits) * n];
    let mut scales = vec![0f32; k / GROUP * n];
    for (column, row) in w.chunks_exact(k).enumerate().take(n) {
        for (g, group) in row.chunks_exact(GROUP).enumerate() {
            let amax = absmax(group);
            let scale = if amax.is_nan() || amax > 0.0 { amax / qmax } else { 1.0 };
            scales[g * n + column] = scale;
            for (offset, &v) in group.iter().enumerate() {
                let r = g * GROUP + offset;
                let code = ((v / scale).round().clamp(-qmax, qmax) as i32 + zero) as u32;
                put_code(&mut words, n, column, r, bits, code);
            }
        }
    }
    QuantMatrix { words, scales }
}

/// Twice the value of an e2m1 code (sign bit 3, exponent bits 2-1, mantissa bit 0), an
/// integer: the kernel decodes the same way and MXFP4 slot scales carry the factor 1/2.
pub fn e2m1_twice(code: u32) -> i32 {
    let (e, m) = ((code >> 1) & 3, (code & 1) as i32);
    let magnitude = if e == 0 { m } else { (2 + m) << (e - 1) };
    if code & 8 != 0 { -magnitude } else { magnitude }
}

/// `2^exponent` as f32, subnormals included (MXFP4 scales reach 2^-128).
pub fn pow2(exponent: i32) -> f32 {
    match exponent {
        e if e >= -126 => f32::from_bits(((e + 127).min(254) as u32) << 23),
        e if e >= -149 => f32::from_bits(1 << (e + 149)),
        _ => 0.0,
    }
}

/// Rounds `w` (checkpoint layout `[n, k]`) to MXFP4 in slot layout: per group the smallest
/// power-of-two scale that keeps the largest magnitude within e2m1's 6, then the nearest code.
pub fn quantize_mxfp4(w: &[f32], n: usize, k: usize) -> QuantMatrix {
    let mut words = vec![0u32; k / 8 * n];
    let mut scales = vec![0f32; k / GROUP * n];
    for (column, row) in w.chunks_exact(k).enumerate().take(n) {
        for (g, group) in row.chunks_exact(GROUP).enumerate() {
            let amax = absmax(group);
            let exponent = if amax > 0.0 { (amax / 6.0).log2().ceil() as i32 } else { 0 };
            // The slot scale holds half the block scale: codes decode to twice their value.
            scales[g * n + column] = if amax.is_nan() { f32::NAN } else { pow2(exponent - 1) };
            for (offset, &v) in group.iter().enumerate() {
                let r = g * GROUP + offset;
                let target = v / pow2(exponent);
                let code = (0..16u32)
                    .min_by(|&a, &b| {
                        let d = |c: u32| (e2m1_twice(c) as f32 / 2.0 - target).abs();
                        d(a).total_cmp(&d(b))
                    })
                    .unwrap_or(0);
                words[r / 8 * n + column] |= code << ((r % 8) as u32 * 4);
            }
        }
    }
    QuantMatrix { words, scales }
}

/// The weights a quantised matrix stands for, in checkpoint layout `[n, k]`.
pub fn dequantize(m: &QuantMatrix, n: usize, k: usize, bits: u32, fp4: bool) -> Vec<f32> {
    let zero = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for column in 0..n {
        for r in 0..k {
            let code = get_code(&m.words, n, column, r, bits);
            let value = if fp4 { e2m1_twice(code) } else { code as i32 - zero };
            w[column * k + r] = value as f32 * m.scales[r / GROUP * n + column];
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_codes_sit_in_bit_planes_and_every_code_reads_back() {
        let (n, k) = (2, 64);
        let mut words = vec![0u32; code_rows(k, 3) * n];
        for r in 0..k {
            put_code(&mut words, n, 1, r, 3, (r * 5 % 8) as u32);
        }
        assert!((0..k).all(|r| get_code(&words, n, 1, r, 3) == (r * 5 % 8) as u32));
        assert!((0..k).all(|r| get_code(&words, n, 0, r, 3) == 0), "column 0 untouched");
        // Code 17 of the first group (5 = 0b101): low part 0b01 in word 1 at bit 2, high bit 17 in word 2.
        let mut one = vec![0u32; 3];
        put_code(&mut one, 1, 0, 17, 3, 5);
        assert_eq!(one, vec![0, 1 << 2, 1 << 17]);
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_groups_scale() {
        let (n, k) = (3, 64);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for bits in [8, 4, 3, 2] {
            let q = quantize(&w, n, k, bits);
            let back = dequantize(&q, n, k, bits, false);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let scale = q.scales[(i % k) / GROUP * n + i / k];
                assert!((a - b).abs() <= scale / 2.0 + 1e-6, "bits {bits} index {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_nan_weight_makes_its_groups_scale_nan_instead_of_a_plausible_code() {
        let (n, k) = (1, 64);
        let mut w = vec![0.5f32; k];
        w[40] = f32::NAN;
        for q in [quantize(&w, n, k, 4), quantize_mxfp4(&w, n, k)] {
            assert!(q.scales[0].is_finite(), "the first group holds no NaN");
            assert!(q.scales[1].is_nan(), "the NaN's group: {:?}", q.scales);
        }
    }

    #[test]
    fn extremes_and_zero_groups_are_exact() {
        let (n, k) = (1, 64);
        let mut w = vec![0f32; k];
        w[0] = -2.0;
        w[1] = 2.0;
        let back = dequantize(&quantize(&w, n, k, 4), n, k, 4, false);
        assert_eq!(&back[..2], &[-2.0, 2.0]);
        assert!(back[2..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn e2m1_codes_decode_to_the_ocp_table_and_mxfp4_rounding_keeps_representable_values() {
        let table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for code in 0..16u32 {
            let want = if code < 8 { table[code as usize] } else { -table[code as usize - 8] };
            assert_eq!(e2m1_twice(code) as f32 / 2.0, want, "code {code}");
        }
        assert_eq!(pow2(-128), f32::from_bits(1 << 21));
        assert_eq!(pow2(3), 8.0);
        // A group of representable values (scale 2^-1: e2m1 values / 2) survives exactly.
        let (n, k) = (2, 64);
        let w: Vec<f32> = (0..n * k).map(|i| table[i % 8] / 2.0 * if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let q = quantize_mxfp4(&w, n, k);
        assert_eq!(dequantize(&q, n, k, 4, true), w);
    }
}
