//! The tests' GPU: burn's wgpu device, opened once per test binary (burn refuses a second
//! initialisation of the same runtime).

use std::sync::OnceLock;

use burn::tensor::Device;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let (device, _setup) = Device::wgpu_options().init_with_setup().expect("a wgpu adapter (lavapipe in CI)");
            device
        })
        .clone()
}

/// `n` values uniform in `-range..range`, reproducible from `seed`.
pub fn random(n: usize, seed: u64, range: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}
