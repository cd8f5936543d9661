//! One decode step's attention in one kernel: scores, softmax (with GPT-OSS's sink column) and
//! the weighted sum of values for every head, reading the cache where it lies.
//!
//! burn's ops take about ten launches for the same (layout copies, two matmuls, the scale and
//! the softmax's reductions), and decode is bound by launches, not bytes. A prefill, a pass that
//! needs the probabilities (`--importance attention`) or a masked span keeps the burn path.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Tensor;
use cubecl::{CubeCount, CubeDim};

use crate::bridge::{from_cube, try_cube_float};

/// Units per head: keys are split among them for the scores and the softmax, value lanes for
/// the weighted sum; `cube_reduce` combines their partials.
const UNITS: usize = crate::reduce::UNITS;

/// `[heads, dv]` attention output of one query per head, or None where the backend is not
/// CubeCL (the caller then runs its burn ops).
///
/// `q` `[heads, 1, dk]`, `keys` `[kv_heads, n, dk]`, `values` `[kv_heads, n, dv]` (any strides);
/// head `h` reads kv head `h / (heads / kv_heads)`; `sinks` `[heads, 1, 1]`.
pub fn decode_attention(
    q: &Tensor<3>,
    keys: &Tensor<3>,
    values: &Tensor<3>,
    sinks: Option<&Tensor<3>>,
    scale: f32,
) -> Option<Tensor<2>> {
    let [heads, _, _] = q.dims();
    let [kv_heads, n, _] = keys.dims();
    let dv = values.dims()[2];
    let qc = try_cube_float(q.clone()).ok()?;
    let kc = try_cube_float(keys.clone()).ok()?;
    let vc = try_cube_float(values.clone()).ok()?;
    let sc = match sinks {
        Some(s) => Some(try_cube_float(s.clone()).ok()?),
        None => None,
    };
    let client = qc.client.clone();
    let empty = |shape: [usize; 2]| {
        burn_cubecl::ops::numeric::empty_device_dtype(client.clone(), qc.device.clone(), shape.into(), qc.dtype)
    };
    let probs = empty([heads, n.max(1)]);
    let out = empty([heads, dv]);
    let dtype = dtype_to_storage_type(qc.dtype);
    let has_sinks = sc.is_some();
    crate::launches::record(&CubeCount::Static(heads as u32, 1, 1), &CubeDim::new_1d(UNITS as u32));
    kernel::decode_attention_kernel::launch(
        &client,
        CubeCount::Static(heads as u32, 1, 1),
        CubeDim::new_1d(UNITS as u32),
        qc.clone().into_tensor_arg(),
        kc.into_tensor_arg(),
        vc.into_tensor_arg(),
        sc.unwrap_or(qc).into_tensor_arg(),
        probs.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (heads / kv_heads) as u32,
        scale,
        has_sinks,
        dtype,
    );
    Some(from_cube(out))
}

/// One decode step's attention on the host: `q` `[heads, dk]`, `keys` `[kv_heads, n, dk]`,
/// `values` `[kv_heads, n, dv]` (contiguous), `sinks` `[heads]`; returns `[heads, dv]`.
pub fn reference(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    sinks: Option<&[f32]>,
    [heads, kv_heads, n, dk, dv]: [usize; 5],
    scale: f32,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let mut out = Vec::with_capacity(heads * dv);
    for h in 0..heads {
        let kv = h / group;
        let scores: Vec<f32> =
            (0..n).map(|j| (0..dk).map(|i| q[h * dk + i] * keys[(kv * n + j) * dk + i]).sum::<f32>() * scale).collect();
        let sink = sinks.map(|s| s[h]);
        let top = scores.iter().copied().chain(sink).fold(f32::MIN, f32::max);
        let exps: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
        let total = exps.iter().sum::<f32>() + sink.map_or(0.0, |s| (s - top).exp());
        for i in 0..dv {
            out.push((0..n).map(|j| exps[j] / total * values[(kv * n + j) * dv + i]).sum());
        }
    }
    out
}

/// The kernel, apart so that its `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use super::UNITS;
    use crate::reduce::cube_reduce;

    /// One cube per head.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)] // the kernel's buffers and scalars, passed through
    pub(super) fn decode_attention_kernel<F: Float>(
        q: &Tensor<F>,         // [heads, 1, dk]
        keys: &Tensor<F>,      // [kv_heads, n, dk]
        values: &Tensor<F>,    // [kv_heads, n, dv]
        sinks: &Tensor<F>,     // [heads, 1, 1] (when has_sinks)
        probs: &mut Tensor<F>, // [heads, n]: scores, then their exponentials
        out: &mut Tensor<F>,   // [heads, dv]
        group: u32,
        scale: f32,
        #[comptime] has_sinks: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let h = CUBE_POS_X as usize;
        let kv = h / group as usize;
        let unit = UNIT_POS_X as usize;
        let n = keys.shape(1);
        let dk = keys.shape(2);
        let dv = values.shape(2);
        let row = h * n;

        // Scores of this unit's keys, and their maximum.
        let q_base = h * q.stride(0);
        let k_base = kv * keys.stride(0);
        let mut top = F::min_value();
        let mut j = unit;
        while j < n {
            let mut s = F::new(0.0);
            for i in 0..dk {
                s += q[q_base + i * q.stride(2)] * keys[k_base + j * keys.stride(1) + i * keys.stride(2)];
            }
            s *= F::cast_from(scale);
            probs[row + j] = s;
            top = max(top, s);
            j += comptime!(UNITS);
        }
        let mut top = cube_reduce::<F>(top, true);
        if has_sinks {
            top = max(top, sinks[h]);
        }

        // Exponentials and their sum (the sink's joins the sum only).
        let mut sum = F::new(0.0);
        let mut j = unit;
        while j < n {
            let e = F::exp(probs[row + j] - top);
            probs[row + j] = e;
            sum += e;
            j += comptime!(UNITS);
        }
        let mut total = cube_reduce::<F>(sum, false);
        if has_sinks {
            total += F::exp(sinks[h] - top);
        }
        // The exponentials other units wrote must be visible before they weigh the values.
        sync_storage();

        let v_base = kv * values.stride(0);
        let mut i = unit;
        while i < dv {
            let mut acc = F::new(0.0);
            for j in 0..n {
                acc += probs[row + j] / total * values[v_base + j * values.stride(1) + i * values.stride(2)];
            }
            out[h * dv + i] = acc;
            i += comptime!(UNITS);
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use crate::testing::{device, max_diff, random};

    /// Grouped heads, a strided cache view, more keys than units and fewer, and a sink column:
    /// the kernel equals the host reference of softmax(q k^T * scale) v.
    #[test]
    fn fused_decode_attention_matches_the_cpu_reference() {
        let device = &device();
        for (n, sinks) in [(3, false), (150, false), (70, true), (1, true)] {
            let (heads, kv_heads, dk, dv, capacity) = (6, 2, 16, 8, 200);
            let qs = random(heads * dk, 1, 2.0);
            let (ks, vs) = (random(kv_heads * capacity * dk, 2, 2.0), random(kv_heads * capacity * dv, 3, 2.0));
            let ss = random(heads, 4, 2.0);
            let q = Tensor::<3>::from_data(TensorData::new(qs.clone(), [heads, 1, dk]), device);
            // The cache holds `capacity` positions; the step attends over the first `n`.
            let keys = Tensor::<3>::from_data(TensorData::new(ks.clone(), [kv_heads, capacity, dk]), device).slice([
                0..kv_heads,
                0..n,
                0..dk,
            ]);
            let values = Tensor::<3>::from_data(TensorData::new(vs.clone(), [kv_heads, capacity, dv]), device).slice([
                0..kv_heads,
                0..n,
                0..dv,
            ]);
            let sink = sinks.then(|| Tensor::<3>::from_data(TensorData::new(ss.clone(), [heads, 1, 1]), device));
            let scale = 0.25;
            let got = super::decode_attention(&q, &keys, &values, sink.as_ref(), scale).expect("CubeCL backend");
            let got: Vec<f32> = got.into_data().try_to_vec().unwrap();
            let first = |v: &[f32], d: usize| -> Vec<f32> {
                v.chunks_exact(capacity * d).flat_map(|head| head[..n * d].to_vec()).collect()
            };
            let shape = [heads, kv_heads, n, dk, dv];
            let want = super::reference(&qs, &first(&ks, dk), &first(&vs, dv), sinks.then_some(&ss[..]), shape, scale);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "{n} keys, sinks {sinks}: max diff {diff}");
        }
    }
}
