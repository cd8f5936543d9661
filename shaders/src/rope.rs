//! Rotary position embeddings, HF "rotate half" layout (the first and second halves of a head
//! rotate together), applied with tables of cos and sin the caller computes per position.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;

use crate::bridge::{from_cube, try_cube_float};

/// Applies the rotation to `x` `[tokens, heads, head_dim]` (any strides: MLA passes a view of
/// its rope lanes), in one fused kernel rather than burn's slices, negation, concatenation and
/// three element-wise ops.
pub fn apply(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let dims = x.dims();
    let (xc, cc, sc) = match (try_cube_float(x), try_cube_float(cos.clone()), try_cube_float(sin.clone())) {
        (Ok(xc), Ok(cc), Ok(sc)) => (xc, cc, sc),
        (Ok(xc), _, _) => return with_burn_ops(from_cube(xc), cos, sin),
        (Err(x), _, _) => return with_burn_ops(*x, cos, sin),
    };
    let client = xc.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype(client.clone(), xc.device.clone(), dims.into(), xc.dtype);
    let elems = dims.iter().product::<usize>();
    let (count, dim) = crate::launches::elementwise(&client, elems);
    let dtype = dtype_to_storage_type(xc.dtype);
    kernel::rope_kernel::launch(
        &client,
        count,
        dim,
        xc.into_tensor_arg(),
        cc.into_tensor_arg(),
        sc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype,
    );
    from_cube(out)
}

/// `x * cos + rotate_half(x) * sin` as burn ops (the fallback for another backend).
fn with_burn_ops(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let [t, h, d] = x.dims();
    let first = x.clone().slice([0..t, 0..h, 0..d / 2]);
    let second = x.clone().slice([0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 2);
    x * cos.clone() + rotated * sin.clone()
}

/// The rotation on the host: `x` `[tokens, heads, d]` contiguous, `cos`/`sin` `[tokens, d]`.
pub fn reference(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    (0..x.len())
        .map(|pos| {
            let (i, t) = (pos % d, pos / (d * heads));
            let head = pos - i;
            let rotated = if i < half { -x[head + i + half] } else { x[head + i - half] };
            x[pos] * cos[t * d + i] + rotated * sin[t * d + i]
        })
        .collect()
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    /// One unit per element of `out` `[tokens, heads, d]` (contiguous); `cos`/`sin` `[tokens, 1, d]`.
    #[cube(launch)]
    pub(super) fn rope_kernel<F: Float>(
        x: &Tensor<F>,
        cos: &Tensor<F>,
        sin: &Tensor<F>,
        out: &mut Tensor<F>,
        #[define(F)] _dtype: ElemType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= out.len() {
            terminate!();
        }
        let d = out.shape(2);
        let heads = out.shape(1);
        let i = pos % d;
        let h = (pos / d) % heads;
        let t = pos / (d * heads);
        let half = d / 2;
        let base = t * x.stride(0) + h * x.stride(1);
        let lane = x.stride(2);
        let rotated = if i < half { -x[base + (i + half) * lane] } else { x[base + (i - half) * lane] };
        let at = t * cos.stride(0) + i * cos.stride(2);
        out[pos] = x[base + i * lane] * cos[at] + rotated * sin[at];
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use crate::testing::{device, max_diff};

    /// The fused kernel gives the host reference's values, on a contiguous input and on a
    /// strided view (MLA's rope lanes at the end of each head).
    #[test]
    fn fused_rotation_matches_the_cpu_reference() {
        let device = &device();
        let (tokens, heads, d) = (3, 4, 8);
        let angle = |t: usize, i: usize| (5 + t) as f32 / 10000f32.powf((2 * (i % (d / 2))) as f32 / d as f32);
        let cos: Vec<f32> = (0..tokens * d).map(|p| angle(p / d, p % d).cos()).collect();
        let sin: Vec<f32> = (0..tokens * d).map(|p| angle(p / d, p % d).sin()).collect();
        let table = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [tokens, 1, d]), device);
        let values: Vec<f32> = (0..tokens * heads * 12).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let x = Tensor::<3>::from_data(TensorData::new(values.clone(), [tokens, heads, 12]), device);
        for lanes in [4..12, 0..8] {
            let input = x.clone().slice([0..tokens, 0..heads, lanes.clone()]);
            let got: Vec<f32> = super::apply(input, &table(&cos), &table(&sin)).into_data().try_to_vec().unwrap();
            let viewed: Vec<f32> = values.chunks_exact(12).flat_map(|head| head[lanes.clone()].to_vec()).collect();
            let diff = max_diff(&got, &super::reference(&viewed, &cos, &sin, heads, d));
            assert!(diff < 1e-6, "lanes {lanes:?}: max diff {diff}");
        }
    }
}
