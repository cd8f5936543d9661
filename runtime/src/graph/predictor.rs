//! Learned next-layer predictors (`ferry predictor fit`, `--prefetch learned`): per MoE layer N
//! a linear map from N's router input to the next MoE layer's router logits, fitted by ridge
//! regression on calibration text, and optionally a ReLU hidden layer fitted to what the map
//! misses (`residual`), saved beside the model as `predictor.safetensors` (`layers.N.weight`
//! `[experts, hidden]`, `layers.N.bias` `[experts]`; with the hidden layer also
//! `layers.N.hidden.weight` `[width, hidden]`, `layers.N.hidden.bias` `[width]` and
//! `layers.N.out.weight` `[experts, width]`; f32). Prefetching with it is exact as with the
//! pre-gate: the real routing still decides.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use ferry_shaders::split::Split;
use rayon::prelude::*;
use safetensors::tensor::TensorView;

use super::linear::{Linear, Loader};
use super::residual::{Head, HiddenLayer};
use crate::error::{FerryError, Result};
use crate::weights::WeightStore;

/// The predictor's file name in a model folder.
pub const PREDICTOR_FILE: &str = "predictor.safetensors";

/// One layer's fitted map: `logits = weight · x + bias`.
#[derive(Debug, Clone)]
pub struct FittedMap {
    /// `[outputs, inputs]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub inputs: usize,
}

impl FittedMap {
    /// `[tokens, outputs]` for `x` `[tokens, inputs]`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let outputs = self.bias.len();
        x.chunks_exact(self.inputs)
            .flat_map(|row| {
                (0..outputs).map(move |o| {
                    let w = &self.weight[o * self.inputs..(o + 1) * self.inputs];
                    self.bias[o] + w.iter().zip(row).map(|(a, b)| a * b).sum::<f32>()
                })
            })
            .collect()
    }
}

/// One MoE layer's fitted predictor of the next one: the linear map and, when fitted, the hidden
/// layer whose output is added to it.
#[derive(Debug, Clone)]
pub struct LayerPredictor {
    pub map: FittedMap,
    pub hidden: Option<HiddenLayer>,
}

impl LayerPredictor {
    /// `[tokens, outputs]` logits for `x` `[tokens, inputs]`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut logits = self.map.apply(x);
        if let Some(hidden) = &self.hidden {
            hidden.add_to(x, &mut logits);
        }
        logits
    }
}

/// A predictor as loaded for the GPU: the linear map and the hidden layer's pre-activations as
/// one projection (`[map | hidden]` columns, so that they join the router's launch), and the
/// hidden layer's output weights, which the host applies.
#[derive(Clone)]
pub struct LoadedPredictor {
    pub linear: Linear,
    pub head: Option<Arc<Head>>,
}

/// Least squares with a ridge penalty, `min |X W^T + b - Y|^2 + lambda |W|^2`, solved in f64
/// through the normal equations; `lambda` is relative to the mean of `X^T X`'s diagonal, so it
/// does not depend on the inputs' scale. The bias is not penalised.
pub fn fit_ridge(x: &[f32], y: &[f32], inputs: usize, outputs: usize, lambda: f64) -> Result<FittedMap> {
    let tokens = x.len() / inputs.max(1);
    if tokens == 0 || x.len() != tokens * inputs || y.len() != tokens * outputs {
        return Err(FerryError::Empty(format!(
            "fitting a predictor needs tokens: {} inputs for {inputs} features, {} targets for {outputs}",
            x.len(),
            y.len()
        )));
    }
    // Inputs plus a constant 1 for the bias.
    let d = inputs + 1;
    let feature = |row: &[f32], i: usize| if i < inputs { f64::from(row[i]) } else { 1.0 };
    let rows: Vec<&[f32]> = x.chunks_exact(inputs).collect();
    let targets: Vec<&[f32]> = y.chunks_exact(outputs).collect();
    let mut gram: Vec<f64> = (0..d)
        .into_par_iter()
        .flat_map_iter(|i| {
            let mut line = vec![0.0f64; d];
            for row in &rows {
                let xi = feature(row, i);
                if xi != 0.0 {
                    for (j, g) in line.iter_mut().enumerate() {
                        *g += xi * feature(row, j);
                    }
                }
            }
            line
        })
        .collect();
    let mut rhs: Vec<f64> = (0..d)
        .into_par_iter()
        .flat_map_iter(|i| {
            let mut line = vec![0.0f64; outputs];
            for (row, target) in rows.iter().zip(&targets) {
                let xi = feature(row, i);
                for (r, t) in line.iter_mut().zip(target.iter()) {
                    *r += xi * f64::from(*t);
                }
            }
            line
        })
        .collect();
    let mean_diagonal = (0..inputs).map(|i| gram[i * d + i]).sum::<f64>() / inputs.max(1) as f64;
    let ridge = lambda.max(0.0) * mean_diagonal.max(f64::MIN_POSITIVE) + 1e-12;
    for i in 0..inputs {
        gram[i * d + i] += ridge;
    }
    cholesky_solve(&mut gram, &mut rhs, d, outputs)?;
    // rhs is now [d, outputs]: W^T with the bias as the last row.
    let weight =
        (0..outputs).flat_map(|o| (0..inputs).map(|i| rhs[i * outputs + o] as f32).collect::<Vec<_>>()).collect();
    let bias = (0..outputs).map(|o| rhs[inputs * outputs + o] as f32).collect();
    Ok(FittedMap { weight, bias, inputs })
}

/// Solves `A X = B` in place for symmetric positive definite `A` `[n, n]`; `B` `[n, m]` becomes X.
fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize, m: usize) -> Result<()> {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for k in 0..j {
            diag -= a[j * n + k] * a[j * n + k];
        }
        if !(diag > 0.0 && diag.is_finite()) {
            return Err(FerryError::NonFinite(format!(
                "fitting a predictor: the inputs' covariance is not positive definite at feature {j} (raise the ridge)"
            )));
        }
        let diag = diag.sqrt();
        a[j * n + j] = diag;
        let (done, rest) = a.split_at_mut((j + 1) * n);
        let row_j = &done[j * n..j * n + j];
        rest.par_chunks_mut(n).for_each(|row_i| {
            let mut v = row_i[j];
            for k in 0..j {
                v -= row_i[k] * row_j[k];
            }
            row_i[j] = v / diag;
        });
    }
    // L y = b, then L^T x = y.
    for i in 0..n {
        for k in 0..i {
            let l = a[i * n + k];
            for c in 0..m {
                b[i * m + c] -= l * b[k * m + c];
            }
        }
        for c in 0..m {
            b[i * m + c] /= a[i * n + i];
        }
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            let l = a[k * n + i];
            for c in 0..m {
                b[i * m + c] -= l * b[k * m + c];
            }
        }
        for c in 0..m {
            b[i * m + c] /= a[i * n + i];
        }
    }
    Ok(())
}

/// Writes predictors `(source MoE layer, predictor)` to `path`.
pub fn write_predictor(path: &Path, predictors: &[(usize, LayerPredictor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = predictors
        .iter()
        .flat_map(|(layer, p)| {
            let (map, outputs) = (&p.map, p.map.bias.len());
            let mut tensors = vec![
                (format!("layers.{layer}.weight"), vec![outputs, map.inputs], f32_bytes(&map.weight)),
                (format!("layers.{layer}.bias"), vec![outputs], f32_bytes(&map.bias)),
            ];
            if let Some(h) = &p.hidden {
                let (width, [weight, bias, out]) = (h.head.width, hidden_names(*layer));
                tensors.extend([
                    (weight, vec![width, h.pre.inputs], f32_bytes(&h.pre.weight)),
                    (bias, vec![width], f32_bytes(&h.pre.bias)),
                    (out, vec![outputs, width], f32_bytes(&h.head.out)),
                ]);
            }
            tensors
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, dims, data)| {
            TensorView::new(safetensors::Dtype::F32, dims.clone(), data).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FerryError::io(path, e))?;
    let metadata = [("format".to_string(), "ferry-predictor".to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| FerryError::io(path, e))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The hidden layer's tensors of MoE layer `from`'s predictor.
fn hidden_names(from: usize) -> [String; 3] {
    [format!("layers.{from}.hidden.weight"), format!("layers.{from}.hidden.bias"), format!("layers.{from}.out.weight")]
}

/// Reads the predictor for each `(from, to)` pair of consecutive MoE layers from `path`, checking
/// that it holds exactly those tensors (the hidden layer's three, or none of them), of the
/// model's shapes, with finite values.
pub(super) fn load_predictor(
    path: &Path,
    pairs: &[(usize, usize)],
    (hidden, experts): (usize, usize),
    device: &Device,
    dense: crate::options::DenseDtype,
    limit: u64,
    split: Split,
) -> Result<Vec<LoadedPredictor>> {
    crate::error::regular_file(path)?;
    let store = WeightStore::open_file(path)?;
    let expected: HashSet<String> = pairs
        .iter()
        .flat_map(|&(from, _)| {
            [format!("layers.{from}.weight"), format!("layers.{from}.bias")].into_iter().chain(hidden_names(from))
        })
        .collect();
    if let Some(extra) = store.names().into_iter().find(|n| !expected.contains(*n)) {
        let layers: Vec<String> = pairs.iter().map(|(from, _)| from.to_string()).collect();
        return Err(FerryError::config(
            path,
            format!(
                "tensor {extra:?} is not a predictor of this model, whose MoE layers {} each predict the next one \
                 (was the predictor fitted on another model?)",
                layers.join(", ")
            ),
        ));
    }
    // Stored like the routers it is concatenated with (a bf16 model rounds it to bf16).
    let loader = Loader { store: &store, device, dense, limit, split, route_on_device: false };
    pairs
        .iter()
        .map(|&(from, _)| {
            let map = loader.linear(&format!("layers.{from}"), hidden, experts, true)?;
            let names = hidden_names(from);
            let present: Vec<&String> = names.iter().filter(|n| store.contains(n)).collect();
            if present.is_empty() {
                return Ok(LoadedPredictor { linear: map, head: None });
            }
            if let Some(missing) = names.iter().find(|n| !store.contains(n)) {
                return Err(FerryError::config(
                    path,
                    format!("tensor {:?} is there but {missing:?} is not: a hidden layer needs all three", present[0]),
                ));
            }
            let width = store.tensor(&names[0]).and_then(|t| t.shape.first().copied()).unwrap_or(0);
            if width == 0 {
                return Err(FerryError::config(path, format!("tensor {:?} has no rows", names[0])));
            }
            let pre = loader.linear(&format!("layers.{from}.hidden"), hidden, width, true)?;
            let out = store.f32(&names[2], &[experts, width])?;
            Ok(LoadedPredictor { linear: Linear::concat(&[&map, &pre])?, head: Some(Arc::new(Head { width, out })) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_map() {
        // y = W x + b exactly, with more tokens than features: a tiny ridge recovers W and b.
        let (inputs, outputs, tokens) = (5, 3, 64);
        let w: Vec<f32> = (0..outputs * inputs).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let b = [0.5f32, -1.0, 2.0];
        let x: Vec<f32> =
            (0..tokens * inputs).map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0 + (i % 5) as f32 * 0.1).collect();
        let truth = FittedMap { weight: w.clone(), bias: b.to_vec(), inputs };
        let y = truth.apply(&x);
        let fitted = fit_ridge(&x, &y, inputs, outputs, 1e-9).unwrap();
        for (got, want) in fitted.weight.iter().zip(&w).chain(fitted.bias.iter().zip(&b)) {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
        assert!(fit_ridge(&x[..3], &y, inputs, outputs, 1e-3).is_err());
    }
}
