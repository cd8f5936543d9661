//! `ferry train`: trains a small dense, MoE or MoLE model from text files on burn's autodiff
//! (the wgpu adapter by default, or ndarray's CPU backend with the `cpu-train` feature), and
//! writes a model folder Ferry loads: config.json, model.safetensors, tokenizer.json. Resumable:
//! the optimizer state and step are saved next to the weights and picked up when `--out` already
//! holds a run.

mod data;
mod net;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use safetensors::tensor::TensorView;

use crate::args::{TrainArch, TrainArgs, TrainDevice};
use data::{Corpus, EOS};
use net::{Arch, NetConfig, Params};

const BETAS: (f32, f32) = (0.9, 0.95);
const ADAM_EPS: f32 = 1e-8;
const WARMUP_STEPS: usize = 50;
const VAL_BATCHES: usize = 8;
/// Weight of the MoE load-balancing loss.
const BALANCE_WEIGHT: f32 = 0.01;

/// What is saved next to the weights so a run can resume.
#[derive(serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    steps: usize,
    config: NetConfig,
    seed: u64,
    /// (step, training loss averaged since the previous entry, validation loss) in nats/token.
    history: Vec<(usize, f32, f32)>,
    corpus: Vec<String>,
    seconds: f64,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let arch = match args.arch {
        TrainArch::Dense => Arch::Dense,
        TrainArch::Moe => Arch::Moe,
        TrainArch::PregatedMoe => Arch::PregatedMoe,
        TrainArch::Mole => Arch::Mole,
    };
    let device = match args.device {
        // burn 0.22 deprecates ndarray in favour of its new `flex` backend; ndarray is the CPU
        // backend the project chose (well tested), until flex is measured here.
        #[cfg(feature = "cpu-train")]
        #[allow(deprecated)]
        TrainDevice::Ndarray => Device::ndarray(),
        #[cfg(not(feature = "cpu-train"))]
        TrainDevice::Ndarray => anyhow::bail!(
            "--device ndarray: this ferry was built without the CPU training backend; rebuild with \
             `cargo build --release --features cpu-train`, or train with --device wgpu"
        ),
        TrainDevice::Wgpu => ferry_runtime::Gpu::open(ferry_runtime::AdapterChoice::Default)?.device.clone(),
    };
    let device = device.autodiff();
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let state_path = args.out.join("trainer_state.json");
    let resuming = state_path.exists();

    let tokenizer = if resuming {
        tokenizers::Tokenizer::from_file(args.out.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.out.join("tokenizer.json").display()))?
    } else {
        eprintln!("training a {}-entry BPE tokenizer on {} file(s)", args.vocab, args.corpus.len());
        let t = data::train_tokenizer(&args.corpus, args.vocab)?;
        data::save_tokenizer(&t, &args.out)?;
        t
    };
    let window = args.seq_len + 1;
    let corpus = Corpus::split(data::encode_corpus(&tokenizer, &args.corpus)?, 0.05, window)?;
    let eos = tokenizer.token_to_id(EOS).context("tokenizer without <|endoftext|>")?;

    let (config, mut params, mut moments, mut state) = if resuming {
        let text = std::fs::read_to_string(&state_path)?;
        let state: TrainerState = serde_json::from_str(&text).with_context(|| state_path.display().to_string())?;
        let (params, moments) = load_checkpoint(&args.out, &state.config, &device)?;
        eprintln!("resuming {} at step {}", args.out.display(), state.step);
        (state.config, params, moments, state)
    } else {
        let experts = args.experts.unwrap_or(match arch {
            Arch::Dense => 1,
            Arch::Moe | Arch::PregatedMoe => 8,
            Arch::Mole => 4,
        });
        let config = NetConfig {
            arch,
            vocab: tokenizer.get_vocab_size(true),
            hidden: args.d_model,
            layers: args.layers,
            heads: args.heads,
            experts: if arch == Arch::Dense { 1 } else { experts },
            top_k: match arch {
                Arch::Dense => 1,
                Arch::Moe | Arch::PregatedMoe => args.top_k,
                Arch::Mole => experts,
            },
            ffn: args.ffn,
            context: 1024,
            eps: 1e-5,
            rope_theta: 10000.0,
        };
        if !config.hidden.is_multiple_of(config.heads) || arch.is_moe() && config.top_k > config.experts {
            anyhow::bail!("--d-model must be a multiple of --heads, and --top-k at most --experts");
        }
        let params = Params::init(&config, args.seed, &device);
        let moments = params.tensors.iter().map(zero_moments).collect();
        let state = TrainerState {
            step: 0,
            steps: args.steps,
            config,
            seed: args.seed,
            history: Vec::new(),
            corpus: args.corpus.iter().map(|p| p.display().to_string()).collect(),
            seconds: 0.0,
        };
        (config, params, moments, state)
    };
    state.steps = args.steps;
    let total_params: usize = config.parameters().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    eprintln!(
        "{:?}: {} parameters, {} train / {} validation tokens, {} steps of {}x{} tokens",
        config.arch,
        total_params,
        corpus.train.len(),
        corpus.val.len(),
        args.steps,
        args.batch,
        args.seq_len
    );

    let mut rng = StdRng::seed_from_u64(args.seed ^ state.step as u64);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{pos}/{len} steps [{bar:30}] {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(state.step as u64);
    let start = Instant::now();
    let seconds_before = state.seconds;
    let (mut loss_sum, mut loss_count) = (0.0f32, 0usize);
    while state.step < args.steps {
        let ids = corpus.train_batch(&mut rng, args.batch, window);
        let (nll, balance) = net::loss(&params, &config, &ids, args.batch, &device);
        let total = nll.clone() + balance * BALANCE_WEIGHT;
        let grads = total.backward();
        let lr = learning_rate(args.lr, state.step, args.steps);
        state.step += 1;
        adamw_step(&mut params, &mut moments, &grads, lr, args.weight_decay, state.step);
        loss_sum += scalar(nll)?;
        loss_count += 1;
        bar.set_position(state.step as u64);
        let last = state.step == args.steps;
        if state.step.is_multiple_of(args.eval_every) || last {
            let val = validation_loss(&params, &config, &corpus, args.batch, window, &device)?;
            let train = loss_sum / loss_count.max(1) as f32;
            state.history.push((state.step, train, val));
            (loss_sum, loss_count) = (0.0, 0);
            bar.set_message(format!("train {train:.3} val {val:.3} lr {lr:.2e}"));
            bar.suspend(|| eprintln!("step {:>6}: train loss {train:.4}, validation loss {val:.4}", state.step));
            state.seconds = seconds_before + start.elapsed().as_secs_f64();
            save_checkpoint(&args.out, &params, &moments, &state, eos, args.save_bf16)?;
        }
    }
    bar.finish_and_clear();
    if let Some((step, train, val)) = state.history.last() {
        eprintln!(
            "done: step {step}, train loss {train:.4}, validation loss {val:.4} nats/token, {:.0} s; model in {}",
            state.seconds,
            args.out.display()
        );
    }
    Ok(())
}

/// Linear warm-up, then cosine decay to a tenth of the peak.
fn learning_rate(peak: f32, step: usize, steps: usize) -> f32 {
    if step < WARMUP_STEPS {
        return peak * (step + 1) as f32 / WARMUP_STEPS as f32;
    }
    let progress = (step - WARMUP_STEPS) as f32 / (steps.saturating_sub(WARMUP_STEPS)).max(1) as f32;
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos())
}

/// First and second moments of one parameter, on the backend without autodiff.
type Moments = (Tensor<2>, Tensor<2>);

fn zero_moments(t: &Tensor<2>) -> Moments {
    let inner = t.clone().inner();
    (inner.zeros_like(), inner.zeros_like())
}

/// AdamW (decoupled weight decay on matrices, not on norm gains), step `t` counted from 1.
fn adamw_step(
    params: &mut Params,
    moments: &mut [Moments],
    grads: &burn::tensor::Gradients,
    lr: f32,
    weight_decay: f32,
    t: usize,
) {
    let (b1, b2) = BETAS;
    let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    for (i, (m, v)) in moments.iter_mut().enumerate() {
        let param = &params.tensors[i];
        let Some(g) = param.grad(grads) else { continue };
        *m = m.clone() * b1 + g.clone() * (1.0 - b1);
        *v = v.clone() * b2 + g.powi_scalar(2) * (1.0 - b2);
        let mut p = param.clone().inner();
        if params.names[i].1.len() == 2 {
            p = p.clone() - p * (lr * weight_decay);
        }
        let update = (m.clone() / c1) / ((v.clone() / c2).sqrt() + ADAM_EPS);
        p = p - update * lr;
        params.tensors[i] = Tensor::from_inner(p).require_grad();
    }
}

fn scalar(t: Tensor<1>) -> Result<f32> {
    let values: Vec<f32> = t.into_data().try_into_vec().map_err(|e| anyhow::anyhow!("reading the loss: {e:?}"))?;
    values.first().copied().context("empty loss")
}

/// Mean loss over the fixed validation batches (nats/token).
fn validation_loss(
    params: &Params,
    config: &NetConfig,
    corpus: &Corpus,
    batch: usize,
    window: usize,
    device: &Device,
) -> Result<f32> {
    let mut losses = Vec::new();
    for i in 0..VAL_BATCHES {
        let Some(ids) = corpus.val_batch(i, batch, window) else { break };
        losses.push(scalar(net::loss(params, config, &ids, batch, device).0.detach())?);
    }
    Ok(losses.iter().sum::<f32>() / losses.len().max(1) as f32)
}

fn host_values(t: &Tensor<2>) -> Result<Vec<f32>> {
    t.clone().inner().into_data().try_into_vec().map_err(|e| anyhow::anyhow!("reading a parameter: {e:?}"))
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], bf16: bool) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| {
            if bf16 {
                v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let dtype = if bf16 { safetensors::Dtype::BF16 } else { safetensors::Dtype::F32 };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| TensorView::new(dtype, shape.clone(), b).map(|v| (name.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, None, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Weights in the HF layout of the arch's family (f32, or bf16 with `--save-bf16`), and in
/// optimizer.safetensors the f32 master weights and moments; config and state.
fn save_checkpoint(
    out: &Path,
    params: &Params,
    moments: &[Moments],
    state: &TrainerState,
    eos: u32,
    bf16: bool,
) -> Result<()> {
    let mut weights = Vec::new();
    let mut optimizer = Vec::new();
    for (i, (name, shape)) in params.names.iter().enumerate() {
        let values = host_values(&params.tensors[i])?;
        optimizer.push((format!("w.{name}"), shape.clone(), values.clone()));
        weights.push((name.clone(), shape.clone(), values));
        let (m, v) = &moments[i];
        let read = |t: &Tensor<2>| t.clone().into_data().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"));
        optimizer.push((format!("m.{name}"), shape.clone(), read(m)?));
        optimizer.push((format!("v.{name}"), shape.clone(), read(v)?));
    }
    if state.config.arch == Arch::PregatedMoe {
        // Blocks after the first route with the previous block's pre-gate and never train their
        // own gate: the checkpoint's gate is that pre-gate, so a run without --pregate-routing
        // applies it to the block's own input (an approximation) instead of to random weights.
        for l in 1..state.config.layers {
            let pregate = format!("model.layers.{}.mlp.pre_gate.weight", l - 1);
            let values = weights.iter().find(|w| w.0 == pregate).map(|w| w.2.clone()).context("a missing pre-gate")?;
            let gate = format!("model.layers.{l}.block_sparse_moe.gate.weight");
            if let Some(w) = weights.iter_mut().find(|w| w.0 == gate) {
                w.2 = values;
            }
        }
    }
    write_safetensors(&out.join("model.safetensors"), &weights, bf16)?;
    write_safetensors(&out.join("optimizer.safetensors"), &optimizer, false)?;
    let c = &state.config;
    let config = match c.arch {
        Arch::Mole => {
            let shape = ferry_models::mole::MoleShape {
                hidden: c.hidden,
                layers: c.layers,
                heads: c.heads,
                kv_heads: c.heads,
                experts: c.experts,
                expert_intermediate: c.expert_intermediate(),
                shared_intermediate: c.ffn,
                context: c.context,
            };
            ferry_models::mole::config_json(shape, c.vocab, eos)
        }
        Arch::Dense | Arch::Moe | Arch::PregatedMoe => serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": c.vocab,
            "hidden_size": c.hidden,
            "intermediate_size": c.expert_intermediate(),
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.heads,
            "num_local_experts": c.experts,
            "num_experts_per_tok": c.top_k,
            "hidden_act": "silu",
            "max_position_embeddings": c.context,
            "rms_norm_eps": c.eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": false,
            "eos_token_id": eos,
            "torch_dtype": "float32"
        }),
    };
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(out.join("generation_config.json"), serde_json::json!({ "eos_token_id": eos }).to_string())?;
    std::fs::write(out.join("trainer_state.json"), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

fn load_checkpoint(out: &Path, config: &NetConfig, device: &Device) -> Result<(Params, Vec<Moments>)> {
    let names = config.parameters();
    let path = out.join("optimizer.safetensors");
    let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let opt = safetensors::SafeTensors::deserialize(&bytes).with_context(|| path.display().to_string())?;
    let values = |key: String| -> Result<Vec<f32>> {
        let view = opt.tensor(&key).with_context(|| format!("{}: {key}", path.display()))?;
        Ok(ferry_runtime::weights::to_f32(view.data(), ferry_runtime::weights::SourceDtype::F32))
    };
    let weights = names.iter().map(|(n, _)| values(format!("w.{n}"))).collect::<Result<Vec<_>>>()?;
    let params = Params::from_values(names.clone(), weights, device);
    let inner = device.clone().inner();
    let moment = |key: String, shape: &[usize]| -> Result<Tensor<2>> {
        let dims = if shape.len() == 1 { [1, shape[0]] } else { [shape[0], shape[1]] };
        Ok(Tensor::from_data(TensorData::new(values(key)?, dims), &inner))
    };
    let moments = names
        .iter()
        .map(|(n, s)| Ok((moment(format!("m.{n}"), s)?, moment(format!("v.{n}"), s)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((params, moments))
}
