//! Vector helpers the kernels share.

use cubecl::prelude::*;

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
