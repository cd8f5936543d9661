//! Ferry's GPU kernels: every `#[cube]` function, its launcher, and a plain-Rust reference on
//! plain slices that its unit test compares it with.
//!
//! The kernels are CubeCL, which burn's runtime compiles for the adapter in use (WGSL, SPIR-V
//! or MSL), so they run on burn's queue and read burn's tensors where they lie. This crate
//! knows tensors and plain parameters only: nothing of models, options or Ferry's errors.

pub mod attention;
pub mod bridge;
pub mod expert;
pub mod flash;
pub mod format;
pub mod lanes;
pub mod launches;
pub mod matvec;
pub mod norm;
pub mod pairs;
pub mod panel;
pub mod reduce;
pub mod rope;
pub mod route;
pub mod split;
pub mod stream;

#[cfg(test)]
mod testing;

pub use bridge::{ShaderError, cube_float, cube_int, from_cube, try_cube_float};
