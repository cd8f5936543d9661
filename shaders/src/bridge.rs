//! The handoff between burn's tensors and CubeCL's: the kernels take the CubeCL tensor under a
//! burn tensor and hand back a burn tensor over their output, with no copy either way.

use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::tensor::{Int, Tensor};
use burn_cubecl::tensor::CubeTensor;

/// What the kernels of this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShaderError {
    /// The tensors are on a backend other than burn's CubeCL one (the kernel names itself).
    #[error("{0} needs burn's CubeCL (wgpu) backend")]
    NotCubeBackend(&'static str),
    /// Data whose size does not fit the buffer it is copied into.
    #[error("{0}")]
    Shape(String),
    /// The device failed to finish queued work.
    #[error("{0}")]
    Device(String),
}

/// The CubeCL tensor under a burn float tensor.
pub fn cube_float<const D: usize>(t: Tensor<D>) -> Result<CubeTensor, ShaderError> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => Ok(burn_cubecl::kernel::untile(c)),
        _ => Err(ShaderError::NotCubeBackend("the grouped expert kernel")),
    }
}

/// The CubeCL tensor under a burn float tensor, or the tensor back when the backend is another
/// (for callers that have a plain burn path to fall back on).
pub fn try_cube_float<const D: usize>(t: Tensor<D>) -> Result<CubeTensor, Box<Tensor<D>>> {
    let dispatch = t.into_dispatch();
    match dispatch.kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => Ok(burn_cubecl::kernel::untile(c)),
        kind => Err(Box::new(Tensor::from_dispatch(DispatchTensor { kind, autodiff: dispatch.autodiff }))),
    }
}

/// The CubeCL tensor under a burn integer tensor.
pub fn cube_int<const D: usize>(t: Tensor<D, Int>) -> Result<CubeTensor, ShaderError> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Int(c)) => Ok(c),
        _ => Err(ShaderError::NotCubeBackend("the grouped expert kernel")),
    }
}

/// A burn float tensor over a CubeCL tensor.
pub fn from_cube<const D: usize>(c: CubeTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(c)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// Whether `client` computes on a CPU adapter (lavapipe, SwiftShader), as far as CubeCL tells:
/// cubecl-wgpu withholds subgroup operations from CPU adapters, so an adapter without them is
/// taken for one (a GPU without subgroups is too, and gets the CPU's shapes).
pub fn cpu_adapter(client: &cubecl::client::Client) -> bool {
    !client.properties().features.plane.contains(cubecl::features::Plane::Ops)
}
