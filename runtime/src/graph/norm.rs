//! RMSNorm over the last dimension, computed in f32 as HuggingFace does.

use burn::tensor::Tensor;

/// `x * rsqrt(mean(x^2) + eps) * weight`, over the last dimension.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f32) -> Tensor<D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed * weight.clone().unsqueeze::<D>()
}
