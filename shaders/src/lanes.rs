//! Vector helpers the kernels share.

use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Inputs per load of an activation row of `steps` values (4, 2 or 1): the decode kernels load
/// `x` a vector at a time, so that one load serves that many weight rows.
pub fn input_lanes(steps: usize) -> usize {
    if steps.is_multiple_of(4) {
        4
    } else if steps.is_multiple_of(2) {
        2
    } else {
        1
    }
}

/// `x` with contiguous rows (what the vector loads of `input_lanes` need): itself, or a copy.
pub fn contiguous(x: &CubeTensor) -> CubeTensor {
    if x.is_contiguous() { x.clone() } else { burn_cubecl::kernel::into_contiguous(x.clone()) }
}

/// `N` consecutive values of a scalar tensor from `at` on. Biases are bound as scalars: an
/// unbiased launch binds a two-element stand-in, too short for a vector binding.
#[cube]
pub fn load_vec<F: Float, N: Size>(t: &Tensor<F>, at: usize) -> Vector<F, N> {
    let mut v = Vector::<F, N>::new(F::new(0.0));
    #[unroll]
    for l in 0..v.vector_size() {
        v.insert(l, t[at + l]);
    }
    v
}

/// The two bf16 weights of `N` adjacent outputs held in one vector of words (a pair along the
/// reduction): the low halves (weight `j`) and the high halves (weight `j + 1`), widened to f32
/// by a shift, which is exact.
#[cube]
pub fn widen<F: Float, N: Size>(words: Vector<u32, N>) -> (Vector<F, N>, Vector<F, N>) {
    let low = Vector::<f32, N>::reinterpret(words << Vector::new(16u32));
    let high = Vector::<f32, N>::reinterpret(words & Vector::new(0xFFFF_0000u32));
    (Vector::<F, N>::cast_from(low), Vector::<F, N>::cast_from(high))
}
