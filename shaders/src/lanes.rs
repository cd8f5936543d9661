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

/// The dot products of `N` adjacent outputs with inputs `start..end` of the contiguous row
/// `v[v_base..]`: the weights of input `start` at `at`, each next input's `step` vectors on (a
/// panel's walk); `v` loaded `M` inputs at a time (one load serves `M` weight rows: on lavapipe a
/// load costs a loop over the batch's lanes, x's as much as a weight's). Summed in index order.
#[cube]
#[allow(clippy::too_many_arguments)] // the walk and the row, as the kernels have them
pub fn dot<F: Float, W: Float, N: Size, M: Size>(
    w: &Tensor<Vector<W, N>>,
    at: usize,
    step: usize,
    v: &Tensor<Vector<F, M>>,
    v_base: usize,
    start: usize,
    end: usize,
) -> Vector<F, N> {
    let m = v.vector_size();
    let mut s = Vector::<F, N>::new(F::new(0.0));
    let mut k = at;
    let mut j = start;
    while j < end {
        let xv = v[(v_base + j) / m];
        #[unroll]
        for l in 0..m {
            s += Vector::<F, N>::cast_from(w[k]) * Vector::<F, N>::new(xv.extract(l));
            k += step;
        }
        j += m;
    }
    s
}

/// `dot` over bf16 pairs (`widen`): pairs `start..end`, each one word per output, `M` even.
#[cube]
#[allow(clippy::too_many_arguments)] // as dot
pub fn dot_pairs<F: Float, N: Size, M: Size>(
    words: &Tensor<Vector<u32, N>>,
    at: usize,
    step: usize,
    v: &Tensor<Vector<F, M>>,
    v_base: usize,
    start: usize,
    end: usize,
) -> Vector<F, N> {
    let m = v.vector_size();
    let per_load = comptime!(m / 2);
    let mut s = Vector::<F, N>::new(F::new(0.0));
    let mut k = at;
    let mut p = start;
    while p < end {
        let xv = v[(v_base + 2 * p) / m];
        #[unroll]
        for w in 0..per_load {
            let (w0, w1) = widen::<F, N>(words[k]);
            s += w0 * Vector::<F, N>::new(xv.extract(2 * w));
            s += w1 * Vector::<F, N>::new(xv.extract(2 * w + 1));
            k += step;
        }
        p += per_load;
    }
    s
}
