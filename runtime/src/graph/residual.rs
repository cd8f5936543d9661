//! The learned predictor's optional hidden layer: ReLU units whose output
//! `out · relu(weight · x + bias)` is added to the ridge map's logits, fitted by AdamW to what
//! the map misses. `out` starts at zero, so training starts from the linear fit.

use super::predictor::FittedMap;
use crate::error::{FerryError, Result};
use crate::gemm::{Mat, gemm};

/// The hidden layer's output weights: what the host adds to a token's predicted logits from
/// the layer's pre-activations (which the GPU computes in the router's launch).
#[derive(Debug, Clone)]
pub struct Head {
    pub width: usize,
    /// `[outputs, width]`, row-major.
    pub out: Vec<f32>,
}

impl Head {
    /// Adds `out · relu(pre)` to `logits` for one token whose pre-activations are `pre`.
    pub fn add_to(&self, pre: &[f32], logits: &mut [f32]) {
        let relu: Vec<f32> = pre.iter().map(|p| p.max(0.0)).collect();
        for (o, logit) in logits.iter_mut().enumerate() {
            let row = &self.out[o * self.width..(o + 1) * self.width];
            *logit += row.iter().zip(&relu).map(|(w, a)| w * a).sum::<f32>();
        }
    }
}

/// `out · relu(pre · x)`, added to a linear map's logits.
#[derive(Debug, Clone)]
pub struct HiddenLayer {
    /// The pre-activations: `[width, inputs]` weights and `[width]` biases.
    pub pre: FittedMap,
    pub head: Head,
}

impl HiddenLayer {
    /// Adds the layer's output for each row of `x` (`[tokens, inputs]`) to `logits`
    /// (`[tokens, outputs]`).
    pub fn add_to(&self, x: &[f32], logits: &mut [f32]) {
        let outputs = self.head.out.len() / self.head.width.max(1);
        let pre = self.pre.apply(x);
        for (p, l) in pre.chunks_exact(self.head.width).zip(logits.chunks_exact_mut(outputs)) {
            self.head.add_to(p, l);
        }
    }
}

/// How the hidden layer is trained.
#[derive(Debug, Clone, Copy)]
pub struct Training {
    pub width: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    /// Decoupled weight decay (AdamW), per step, relative to the learning rate.
    pub weight_decay: f32,
    pub seed: u64,
}

impl Default for Training {
    fn default() -> Self {
        Self { width: 512, epochs: 30, batch: 64, learning_rate: 1e-3, weight_decay: 1e-4, seed: 0x5eed }
    }
}

/// Adam's moments for one parameter tensor.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(len: usize) -> Self {
        Self { m: vec![0.0; len], v: vec![0.0; len] }
    }

    fn step(&mut self, params: &mut [f32], grad: &[f32], step: i32, lr: f32, decay: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for (((p, g), m), v) in params.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * ((*m / c1) / ((*v / c2).sqrt() + eps) + decay * *p);
        }
    }
}

/// A xorshift generator: the same seed gives the same layer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Softmax of `logits` into `out`.
fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let mut total = 0.0f32;
    for (o, l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        total += *o;
    }
    out.iter_mut().for_each(|o| *o /= total);
}

/// Fits a predictor's hidden layer of `training.width` ReLU units on top of its linear map `map`
/// (fitted by ridge regression first), from `x` `[tokens, inputs]` to the target router's
/// `logits` `[tokens, outputs]`: minibatch AdamW on the cross-entropy between the router's
/// softmax and the prediction's (what matters is which experts rank first, not every logit's
/// value), the learning rate falling linearly to zero. Inputs are standardised while training
/// and the scaling is folded into the layer, so it applies to raw inputs. (Fine-tuning the map
/// with it measured no better on the fine-grained trained model.)
pub fn fit_hidden(x: &[f32], logits: &[f32], map: &FittedMap, training: Training) -> Result<HiddenLayer> {
    let (inputs, outputs) = (map.inputs, map.bias.len());
    let tokens = x.len() / inputs.max(1);
    let Training { width, epochs, batch, learning_rate, weight_decay, seed } = training;
    if tokens == 0 || width == 0 || x.len() != tokens * inputs || logits.len() != tokens * outputs {
        return Err(FerryError::Empty(format!(
            "fitting a hidden layer needs tokens and a width: {} inputs for {inputs} features, {} targets for \
             {outputs}, width {width}",
            x.len(),
            logits.len()
        )));
    }
    let mean: Vec<f32> = (0..inputs)
        .map(|i| x.chunks_exact(inputs).map(|r| f64::from(r[i])).sum::<f64>() as f32 / tokens as f32)
        .collect();
    let scale: Vec<f32> = (0..inputs)
        .map(|i| {
            let var = x.chunks_exact(inputs).map(|r| f64::from(r[i] - mean[i]).powi(2)).sum::<f64>() / tokens as f64;
            // A feature constant over the calibration text carries nothing to learn from; scaled
            // by 0, its (untrained) weights fold to 0 rather than to huge values.
            let std = var.sqrt() as f32;
            if std > 1e-6 { 1.0 / std } else { 0.0 }
        })
        .collect();
    let standard: Vec<f32> =
        x.chunks_exact(inputs).flat_map(|r| r.iter().enumerate().map(|(i, v)| (v - mean[i]) * scale[i])).collect();
    let mut target = vec![0.0f32; logits.len()];
    for (t, l) in target.chunks_exact_mut(outputs).zip(logits.chunks_exact(outputs)) {
        softmax(l, t);
    }

    let mut rng = Rng(seed.max(1));
    // He initialisation for ReLU; the output starts at zero (the linear fit).
    let bound = (6.0 / inputs as f32).sqrt();
    let mut w1: Vec<f32> = (0..width * inputs).map(|_| rng.symmetric() * bound).collect();
    let mut b1 = vec![0.0f32; width];
    let mut w2 = vec![0.0f32; outputs * width];
    let mut adam = [w1.len(), width, w2.len()].map(Adam::new);
    let base = map.apply(x);

    let batch = batch.clamp(1, tokens);
    let total = (epochs.max(1) * tokens.div_ceil(batch)) as f32;
    let mut order: Vec<usize> = (0..tokens).collect();
    let mut sb = vec![0.0f32; batch * inputs];
    let (mut z, mut p) = (vec![0.0f32; batch * width], vec![0.0f32; batch * outputs]);
    let mut dp = vec![0.0f32; batch * outputs];
    let (mut gw1, mut gw2, mut gb1) =
        (vec![0.0f32; width * inputs], vec![0.0f32; outputs * width], vec![0.0f32; width]);
    let mut da = vec![0.0f32; batch * width];
    let mut probs = vec![0.0f32; outputs];
    let mut step = 0i32;
    for _ in 0..epochs.max(1) {
        for i in (1..tokens).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for chunk in order.chunks(batch) {
            let n = chunk.len();
            for (j, &t) in chunk.iter().enumerate() {
                sb[j * inputs..(j + 1) * inputs].copy_from_slice(&standard[t * inputs..(t + 1) * inputs]);
            }
            let ss = &sb[..n * inputs];
            // Forward: a = relu(s W1^T + b1) on standardised inputs, p = a W2^T, added to the map's.
            gemm(Mat::rows(ss, n, inputs), Mat::transposed(&w1, width, inputs), &mut z);
            for row in z[..n * width].chunks_exact_mut(width) {
                for (v, b) in row.iter_mut().zip(&b1) {
                    *v = (*v + b).max(0.0);
                }
            }
            let a = &z[..n * width];
            gemm(Mat::rows(a, n, width), Mat::transposed(&w2, outputs, width), &mut p);
            // dLoss/dlogits of the mean cross-entropy: softmax(prediction) - softmax(router).
            for (j, &t) in chunk.iter().enumerate() {
                let row = j * outputs..(j + 1) * outputs;
                let sum: Vec<f32> = (0..outputs).map(|o| base[t * outputs + o] + p[j * outputs + o]).collect();
                softmax(&sum, &mut probs);
                for (o, d) in dp[row].iter_mut().enumerate() {
                    *d = (probs[o] - target[t * outputs + o]) / n as f32;
                }
            }
            let dp = &dp[..n * outputs];
            gemm(Mat::transposed(dp, n, outputs), Mat::rows(a, n, width), &mut gw2);
            gemm(Mat::rows(dp, n, outputs), Mat::rows(&w2, outputs, width), &mut da);
            for (d, a) in da[..n * width].iter_mut().zip(a) {
                if *a <= 0.0 {
                    *d = 0.0;
                }
            }
            let dz = &da[..n * width];
            gemm(Mat::transposed(dz, n, width), Mat::rows(ss, n, inputs), &mut gw1);
            gb1.iter_mut().enumerate().for_each(|(h, g)| *g = dz.chunks_exact(width).map(|r| r[h]).sum());
            step += 1;
            let lr = learning_rate * (1.0 - (step - 1) as f32 / total);
            let [a1, ab1, a2] = &mut adam;
            a1.step(&mut w1, &gw1, step, lr, weight_decay);
            ab1.step(&mut b1, &gb1, step, lr, 0.0);
            a2.step(&mut w2, &gw2, step, lr, weight_decay);
        }
    }
    if w1.iter().chain(&b1).chain(&w2).any(|v| !v.is_finite()) {
        return Err(FerryError::NonFinite("fitting a hidden layer: training diverged (NaN or Inf weights)".into()));
    }
    // Fold the standardisation in: w1 (x - mean) * scale = (w1 * scale) x - (w1 * scale) . mean.
    for h in 0..width {
        let row = &mut w1[h * inputs..(h + 1) * inputs];
        let mut shift = 0.0f32;
        for i in 0..inputs {
            row[i] *= scale[i];
            shift += row[i] * mean[i];
        }
        b1[h] -= shift;
    }
    Ok(HiddenLayer { pre: FittedMap { weight: w1, bias: b1, inputs }, head: Head { width, out: w2 } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_layer_learns_what_a_linear_map_cannot() {
        // Expert 0 ranks first where |x0 - 1| > |x1 - 1|: no linear map ranks it so, two ReLUs
        // per term do.
        let mut rng = Rng(7);
        let tokens = 4096;
        let x: Vec<f32> = (0..tokens * 2).map(|_| rng.symmetric() * 3.0 + 1.0).collect();
        let logits: Vec<f32> =
            x.chunks_exact(2).flat_map(|r| [4.0 * ((r[0] - 1.0).abs() - (r[1] - 1.0).abs()), 0.0]).collect();
        let first = |l: &[f32]| -> Vec<bool> { l.chunks_exact(2).map(|r| r[0] > r[1]).collect() };
        let agree = |got: &[f32]| first(got).iter().zip(first(&logits)).filter(|(a, b)| **a == *b).count();
        let linear = crate::graph::fit_ridge(&x, &logits, 2, 2, 1e-6).unwrap();
        assert!(agree(&linear.apply(&x)) < tokens * 3 / 4, "a linear map ranks the experts too well");
        let training = Training { width: 32, epochs: 20, ..Training::default() };
        // A third input that never varies is ignored: its weights fold to 0, not to 1/0.
        let with_constant: Vec<f32> = x.chunks_exact(2).flat_map(|r| [r[0], r[1], 5.0]).collect();
        let map3 = FittedMap { weight: vec![0.0; 6], bias: vec![0.0; 2], inputs: 3 };
        let layer3 = fit_hidden(&with_constant, &logits, &map3, Training { epochs: 1, ..training }).unwrap();
        assert!(
            layer3.pre.weight.chunks_exact(3).all(|w| w[2] == 0.0) && layer3.pre.bias.iter().all(|b| b.is_finite())
        );
        let layer = fit_hidden(&x, &logits, &linear, training).unwrap();
        let mut got = linear.apply(&x);
        layer.add_to(&x, &mut got);
        assert!(agree(&got) > tokens * 95 / 100, "{} of {tokens} ranked right", agree(&got));
        // The same seed gives the same layer.
        assert_eq!(fit_hidden(&x, &logits, &linear, training).unwrap().pre.weight, layer.pre.weight);
        assert!(fit_hidden(&x[..3], &logits, &linear, training).is_err());
    }
}
