//! The training-time network: the same decoder Ferry runs (RMSNorm, RoPE "rotate half",
//! causal attention, SwiGLU), with its parameters kept by their HuggingFace names so a
//! checkpoint is written straight into the layout the loaders read. Three feed-forwards:
//! dense (a Mixtral layer with one expert), MoE (Mixtral: softmax, top-k, renormalised, plus a
//! Switch-style load-balancing loss), pre-gated MoE (the same, except that block N's pre-gate
//! `mlp.pre_gate`, applied to N's MoE input, chooses block N+1's experts and weights; block 0
//! keeps its own gate, as in Pre-gated MoE) and MoLE (Ferry's `FerryMoleForCausalLM`).

use std::collections::HashMap;

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which feed-forward the model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Dense,
    Moe,
    PregatedMoe,
    Mole,
}

impl Arch {
    /// Routed experts in Mixtral's layout.
    pub fn is_moe(self) -> bool {
        matches!(self, Self::Moe | Self::PregatedMoe)
    }
}

/// Model shape. `ffn` is the active feed-forward width per token: the dense intermediate size,
/// top_k x the MoE expert size, and the MoLE shared FFN's (its lookup experts are free at
/// inference).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub experts: usize,
    pub top_k: usize,
    pub ffn: usize,
    pub context: usize,
    pub eps: f32,
    pub rope_theta: f32,
}

impl NetConfig {
    /// Intermediate size of one routed (MoE) or lookup (MoLE) expert.
    pub fn expert_intermediate(&self) -> usize {
        match self.arch {
            Arch::Dense => self.ffn,
            Arch::Moe | Arch::PregatedMoe => self.ffn / self.top_k.max(1),
            Arch::Mole => self.ffn,
        }
    }

    /// Every parameter's HF name and shape (vectors as `[len]`).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden, self.vocab);
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("lm_head.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        let ffn = |out: &mut Vec<(String, Vec<usize>)>, base: String, names: [&str; 3], inter: usize| {
            out.push((format!("{base}.{}.weight", names[0]), vec![inter, h]));
            out.push((format!("{base}.{}.weight", names[1]), vec![inter, h]));
            out.push((format!("{base}.{}.weight", names[2]), vec![h, inter]));
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
            }
            match self.arch {
                Arch::Dense | Arch::Moe | Arch::PregatedMoe => {
                    out.push((format!("{p}.block_sparse_moe.gate.weight"), vec![self.experts, h]));
                    if self.arch == Arch::PregatedMoe && l + 1 < self.layers {
                        out.push((format!("{p}.mlp.pre_gate.weight"), vec![self.experts, h]));
                    }
                    for e in 0..self.experts {
                        let base = format!("{p}.block_sparse_moe.experts.{e}");
                        ffn(&mut out, base, ["w1", "w3", "w2"], self.expert_intermediate());
                    }
                }
                Arch::Mole => {
                    out.push((format!("{p}.mlp.router.weight"), vec![self.experts, h]));
                    ffn(&mut out, format!("{p}.mlp.shared_mlp"), ["gate_proj", "up_proj", "down_proj"], self.ffn);
                    out.push((format!("{p}.mlp.expert_norm.weight"), vec![h]));
                    for e in 0..self.experts {
                        let base = format!("{p}.mlp.experts.{e}");
                        ffn(&mut out, base, ["gate_proj", "up_proj", "down_proj"], self.expert_intermediate());
                    }
                }
            }
        }
        out
    }
}

/// Parameters by name, each a `[rows, cols]` tensor (vectors as `[1, len]`).
pub struct Params {
    pub names: Vec<(String, Vec<usize>)>,
    pub tensors: Vec<Tensor<2>>,
    index: HashMap<String, usize>,
}

fn as_2d(shape: &[usize]) -> [usize; 2] {
    if shape.len() == 1 { [1, shape[0]] } else { [shape[0], shape[1]] }
}

impl Params {
    pub fn from_values(names: Vec<(String, Vec<usize>)>, values: Vec<Vec<f32>>, device: &Device) -> Self {
        let tensors = names
            .iter()
            .zip(values)
            .map(|((_, shape), v)| Tensor::from_data(TensorData::new(v, as_2d(shape)), device).require_grad())
            .collect();
        let index = names.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        Self { names, tensors, index }
    }

    /// Norm gains 1, embeddings N(0, 0.02)-like, projections uniform in +-1/sqrt(fan-in).
    pub fn init(config: &NetConfig, seed: u64, device: &Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let names = config.parameters();
        let values = names
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                if shape.len() == 1 {
                    vec![1.0; n]
                } else {
                    let bound = if name.contains("embed_tokens") { 0.035 } else { 1.0 / (shape[1] as f32).sqrt() };
                    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect()
                }
            })
            .collect();
        Self::from_values(names, values, device)
    }

    pub fn get(&self, name: &str) -> Tensor<2> {
        self.tensors[self.index[name]].clone()
    }

    fn vector(&self, name: &str) -> Tensor<1> {
        self.get(name).reshape([-1])
    }

    /// `x W^T` with `W` stored `[out, in]`.
    fn linear(&self, x: Tensor<2>, name: &str) -> Tensor<2> {
        x.matmul(self.get(name).transpose())
    }

    fn swiglu(&self, x: Tensor<2>, base: &str, names: [&str; 3]) -> Tensor<2> {
        let gate = silu(self.linear(x.clone(), &format!("{base}.{}.weight", names[0])));
        let up = self.linear(x, &format!("{base}.{}.weight", names[1]));
        self.linear(gate * up, &format!("{base}.{}.weight", names[2]))
    }
}

fn rms_norm(x: Tensor<2>, weight: Tensor<1>, eps: f32) -> Tensor<2> {
    let variance = x.clone().powi_scalar(2).mean_dim(1);
    x * (variance + eps).sqrt().recip() * weight.unsqueeze::<2>()
}

/// RoPE tables `[1, seq, 1, head_dim]` as Ferry's runtime computes them.
fn rope_tables(config: &NetConfig, seq: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let d = config.hidden / config.heads;
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..seq {
        for _ in 0..2 {
            for f in &inv {
                cos.push((p as f32 * f).cos());
                sin.push((p as f32 * f).sin());
            }
        }
    }
    let shape = [1, seq, 1, d];
    (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
}

fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, t, h, d] = x.dims();
    let first = x.clone().slice([0..b, 0..t, 0..h, 0..d / 2]);
    let second = x.clone().slice([0..b, 0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Mean next-token cross-entropy of `ids` `[batch, seq + 1]` (nats), plus the MoE
/// load-balancing term (0 for other archs), both as one-element tensors.
pub fn loss(params: &Params, config: &NetConfig, ids: &[u32], batch: usize, device: &Device) -> (Tensor<1>, Tensor<1>) {
    let seq = ids.len() / batch - 1;
    let (inputs, targets): (Vec<i64>, Vec<i64>) =
        ids.chunks_exact(seq + 1).flat_map(|w| (0..seq).map(move |i| (i64::from(w[i]), i64::from(w[i + 1])))).unzip();
    let n = batch * seq;
    let (logits, balance) = forward(params, config, inputs, batch, device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
    let nll = log_softmax(logits, 1).gather(1, targets).neg().mean();
    (nll.reshape([1]), balance)
}

/// Logits `[batch * seq, vocab]` of `inputs` (`batch` rows of `seq` ids, flattened), plus the
/// MoE load-balancing term averaged over layers.
pub fn forward(
    params: &Params,
    config: &NetConfig,
    inputs: Vec<i64>,
    batch: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<1>) {
    let n = inputs.len();
    let seq = n / batch;
    let (h, heads) = (config.hidden, config.heads);
    let hd = h / heads;
    let index = Tensor::<1, Int>::from_data(TensorData::new(inputs, [n]), device);
    let embedded = params.get("model.embed_tokens.weight").select(0, index);
    let mut x = embedded.clone();
    let (cos, sin) = rope_tables(config, seq, device);
    let mask: Vec<f32> = (0..seq * seq).map(|i| if i % seq > i / seq { -1e9 } else { 0.0 }).collect();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [seq, seq]), device).reshape([1, 1, seq, seq]);
    let mut balance = Tensor::<1>::zeros([1], device);
    // Pre-gated MoE: the router logits the previous block's pre-gate computed for this block.
    let mut pregated: Option<Tensor<2>> = None;
    for l in 0..config.layers {
        let p = format!("model.layers.{l}");
        let a = rms_norm(x.clone(), params.vector(&format!("{p}.input_layernorm.weight")), config.eps);
        let heads_of = |name: &str| {
            params.linear(a.clone(), &format!("{p}.self_attn.{name}.weight")).reshape([batch, seq, heads, hd])
        };
        let q = rope(heads_of("q_proj"), &cos, &sin).swap_dims(1, 2);
        let k = rope(heads_of("k_proj"), &cos, &sin).swap_dims(1, 2);
        let v = heads_of("v_proj").swap_dims(1, 2);
        let scores = q.matmul(k.transpose()) / (hd as f32).sqrt() + mask.clone();
        let attn = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([n, h]);
        x = x + params.linear(attn, &format!("{p}.self_attn.o_proj.weight"));
        let m = rms_norm(x.clone(), params.vector(&format!("{p}.post_attention_layernorm.weight")), config.eps);
        let y = match config.arch {
            Arch::Dense | Arch::Moe | Arch::PregatedMoe => {
                let logits = match pregated.take() {
                    Some(logits) => logits,
                    None => params.linear(m.clone(), &format!("{p}.block_sparse_moe.gate.weight")),
                };
                if config.arch == Arch::PregatedMoe && l + 1 < config.layers {
                    pregated = Some(params.linear(m.clone(), &format!("{p}.mlp.pre_gate.weight")));
                }
                let probs = softmax(logits, 1);
                let e = config.experts;
                let k = config.top_k.min(e);
                let kth = probs.clone().detach().sort_descending(1).slice([0..n, k - 1..k]).repeat_dim(1, e);
                let chosen = probs.clone().detach().greater_equal(kth).float();
                let weights = probs.clone() * chosen.clone();
                let weights = weights.clone() / weights.sum_dim(1);
                if config.arch.is_moe() {
                    // Switch Transformer: E * sum_e (share of tokens routed to e) * (mean prob of e).
                    let share = chosen.mean_dim(0) / k as f32;
                    let mean_prob = probs.mean_dim(0);
                    balance = balance + (share * mean_prob).sum().reshape([1]) * e as f32;
                }
                (0..e).fold(Tensor::zeros([n, h], device), |acc, j| {
                    let out =
                        params.swiglu(m.clone(), &format!("{p}.block_sparse_moe.experts.{j}"), ["w1", "w3", "w2"]);
                    acc + out * weights.clone().slice([0..n, j..j + 1])
                })
            }
            Arch::Mole => {
                let gates = softmax(params.linear(m.clone(), &format!("{p}.mlp.router.weight")), 1);
                let e = rms_norm(embedded.clone(), params.vector(&format!("{p}.mlp.expert_norm.weight")), config.eps);
                let names = ["gate_proj", "up_proj", "down_proj"];
                let shared = params.swiglu(m, &format!("{p}.mlp.shared_mlp"), names);
                (0..config.experts).fold(shared, |acc, j| {
                    let out = params.swiglu(e.clone(), &format!("{p}.mlp.experts.{j}"), names);
                    acc + out * gates.clone().slice([0..n, j..j + 1])
                })
            }
        };
        x = x + y;
    }
    let x = rms_norm(x, params.vector("model.norm.weight"), config.eps);
    (params.linear(x, "lm_head.weight"), balance / config.layers as f32)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ferry_runtime::graph::{LogitsFor, Model};
    use ferry_runtime::options::ExpertOptions;
    use ferry_runtime::{AdapterChoice, Gpu};

    use super::{NetConfig, Params, forward};

    /// The decoder `ferry train` optimises is the one Ferry runs: for each trained model in
    /// `models/trained/`, the trainer's forward pass over the saved weights gives Ferry's
    /// inference logits (both in f32 on the same device; they differ only in summation order).
    /// The pre-gated model runs with `--pregate-routing`, as it was trained.
    #[test]
    fn the_training_forward_pass_equals_ferrys_inference_logits() {
        let gpu = Gpu::open(AdapterChoice::Default).expect("a wgpu adapter (lavapipe in CI)");
        for arch in ["dense", "moe", "mole", "moe-32x4", "pregated-moe"] {
            let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/trained").join(arch);
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(folder.join("trainer_state.json")).unwrap()).unwrap();
            let config: NetConfig = serde_json::from_value(state["config"].clone()).unwrap();
            let opened = ferry_models::open(&folder).unwrap();
            let names = config.parameters();
            let values = names.iter().map(|(name, shape)| opened.weights.f32(name, shape).unwrap()).collect();
            // The trainer's parameters live on an autodiff device, as in `ferry train`.
            let device = gpu.device.clone().autodiff();
            let params = Params::from_values(names, values, &device);
            let ids: Vec<u32> = (0..12).map(|i| (i * 97 + 5) % config.vocab as u32).collect();
            let (logits, _) = forward(&params, &config, ids.iter().map(|&i| i64::from(i)).collect(), 1, &device);
            let trainer: Vec<f32> = logits.into_data().try_into_vec().unwrap();

            let options = ExpertOptions { pregate_routing: arch == "pregated-moe", ..Default::default() };
            let mut model = Model::load_with(opened.spec, &opened.weights, &gpu.device, options).unwrap();
            let mut cache = model.new_cache(ids.len()).unwrap();
            let ferry: Vec<f32> = model.forward(&ids, &mut cache, LogitsFor::All).unwrap().logits.concat();
            let scale = ferry.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = trainer.iter().zip(&ferry).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{arch}: trainer vs Ferry logits: max |diff| {diff:.3e} (largest {scale:.3})");
            assert!(diff <= 1e-4 * scale.max(1.0), "{arch}: the trainer's logits differ from Ferry's by {diff}");
        }
    }
}
