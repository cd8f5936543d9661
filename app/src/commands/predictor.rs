//! `ferry predictor fit`: a next-layer predictor per MoE layer, fitted on calibration text (a
//! ridge map from N's router input to N+1's router logits, and a ReLU hidden layer on top of
//! it unless `--hidden 0`), its recall on held-out tokens next to the plug-and-play pre-gate's,
//! the map's alone and a two-layers-ahead map's, written beside the model for
//! `--prefetch learned`.

use anyhow::{Context, Result};
use ferry_runtime::experts::TraceOptions;
use ferry_runtime::graph::{
    FittedMap, LayerPredictor, LogitsFor, PREDICTOR_FILE, Training, fit_hidden, fit_ridge, write_predictor,
};
use ferry_runtime::options::{ExpertOptions, PrefetchMode};

use crate::args::{PredictorCommand, PredictorFitArgs};
use crate::load;

pub fn run(command: PredictorCommand) -> Result<()> {
    match command {
        PredictorCommand::Fit(args) => fit(args),
    }
}

/// What the calibration pass recorded for one MoE layer, token by token.
#[derive(Default)]
struct LayerData {
    inputs: Vec<f32>,
    /// The block's input before attention (input-normed residual stream).
    block_inputs: Vec<f32>,
    logits: Vec<f32>,
    chosen: Vec<Vec<u32>>,
    /// The model's own predictor's experts for the next MoE layer.
    predicted: Vec<Vec<u32>>,
}

#[derive(serde::Serialize)]
struct PairReport {
    from: usize,
    to: usize,
    /// Held-out recall of the model's own predictor (next router or trained pre-gate).
    own: Option<f64>,
    /// The written predictor's (the map, plus the hidden layer when fitted).
    learned: f64,
    /// The linear map's alone, when a hidden layer was fitted on it.
    linear: Option<f64>,
    /// The learned fit from `from` to the MoE layer after `to`, when there is one.
    two_ahead: Option<(usize, f64)>,
    /// A fit from `to`'s own block input before its attention (the residual stream after
    /// `from`'s block, input-normed) to `to`'s router logits: the published "pre-attention"
    /// predictors' setting, whose lookahead is `to`'s attention only. Measured, not written.
    pre_attention: f64,
}

#[derive(serde::Serialize)]
struct FitReport {
    out: String,
    fit_tokens: usize,
    held_out_tokens: usize,
    own_predictor: String,
    layers: Vec<PairReport>,
    mean_own: Option<f64>,
    mean_learned: f64,
    mean_linear: Option<f64>,
    mean_two_ahead: Option<f64>,
    mean_pre_attention: f64,
}

/// Top-`k` indices of each row of `logits` `[tokens, width]`.
fn top_k(logits: &[f32], width: usize, k: usize) -> Vec<Vec<u32>> {
    logits
        .chunks_exact(width)
        .map(|row| {
            let mut order: Vec<u32> = (0..width as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            order.truncate(k);
            order
        })
        .collect()
}

/// Share of the real (token, expert) choices that were predicted.
fn recall(predicted: &[Vec<u32>], chosen: &[Vec<u32>]) -> f64 {
    let (mut hit, mut all) = (0usize, 0usize);
    for (guess, real) in predicted.iter().zip(chosen) {
        all += real.len();
        hit += real.iter().filter(|e| guess.contains(e)).count();
    }
    hit as f64 / all.max(1) as f64
}

fn fit(args: PredictorFitArgs) -> Result<()> {
    if !(0.05..=0.5).contains(&args.holdout) {
        anyhow::bail!("--holdout must be from 0.05 to 0.5, got {}", args.holdout);
    }
    if !(0.0..=1.0).contains(&args.ridge) {
        anyhow::bail!("--ridge must be from 0 to 1, got {}", args.ridge);
    }
    let folder = load::model_folder(&args.model)?;
    let out = args.out.clone().unwrap_or_else(|| folder.join(PREDICTOR_FILE));
    // The calibration run predicts with the model's own predictor, whatever --prefetch says.
    let options =
        ExpertOptions { prefetch: PrefetchMode::None, pregate_routing: false, ..load::expert_options(&args.model)? };
    let mut model_args = args.model.clone();
    model_args.prefetch = PrefetchMode::None;
    model_args.pregate_routing = false;
    let mut loaded = load::engine(&model_args, true)?;
    let model = &mut loaded.engine.model;
    model.set_expert_options(options)?;
    let tokenizer =
        loaded.engine.tokenizer.as_ref().context("predictor fit needs tokenizer.json in the model folder")?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("--text {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text, true)?;
    ids.truncate(args.max_tokens);
    let spec = model.spec().clone();
    let moe = spec.moe_layers();
    if moe.len() < 2 {
        anyhow::bail!("--model {}: a predictor needs two MoE layers; this model has {}", folder.display(), moe.len());
    }
    let (hidden, experts, k) = (spec.hidden_size, spec.moe.num_experts, spec.moe.top_k);
    let held_out = ((ids.len() as f64 * args.holdout).round() as usize).max(1);
    let fit_tokens = ids.len().saturating_sub(held_out);
    // Enough tokens that the least-squares problem is not underdetermined.
    if fit_tokens < hidden + 2 {
        anyhow::bail!(
            "--text {}: {} tokens (with --max-tokens {}); fitting {hidden} inputs needs at least {} besides the {:.0}% held out",
            args.text.display(),
            ids.len(),
            args.max_tokens,
            hidden + 2,
            100.0 * args.holdout
        );
    }

    let own_predictor = crate::commands::trace::predictor_name(model, PrefetchMode::None).unwrap_or_default();
    let mut data: Vec<LayerData> = (0..spec.layers.len()).map(|_| LayerData::default()).collect();
    model.experts_mut().set_trace(Some(TraceOptions { inputs: true }));
    let window = args.window.min(model.context_limit());
    let result = (|| -> Result<()> {
        for chunk in ids.chunks(window) {
            let mut cache = model.new_cache(chunk.len())?;
            model.forward(chunk, &mut cache, LogitsFor::Last)?;
            for entry in model.experts_mut().take_trace() {
                let d = &mut data[entry.layer];
                let tokens = entry.experts.len();
                d.inputs.extend(entry.inputs.context("the trace holds no router inputs")?);
                d.block_inputs.extend(entry.block_inputs.context("the trace holds no block inputs")?);
                d.logits.extend(entry.logits.context("the trace holds no router logits")?);
                d.chosen.extend(entry.experts);
                match entry.predicted {
                    Some(p) => d.predicted.extend(p.experts.into_iter().map(|mut e| {
                        e.truncate(k);
                        e
                    })),
                    None => d.predicted.extend(std::iter::repeat_n(Vec::new(), tokens)),
                }
            }
        }
        Ok(())
    })();
    model.experts_mut().set_trace(None);
    result?;

    let mut predictors: Vec<(usize, LayerPredictor)> = Vec::new();
    let mut layers = Vec::new();
    for (i, &from) in moe.iter().enumerate() {
        let Some(&to) = moe.get(i + 1) else { break };
        // A ridge map from `x` (`[tokens, hidden]`) to `target`'s router logits, and its recall
        // on the held-out tokens.
        let fit = |x: &[f32], target: usize| -> Result<(FittedMap, f64)> {
            let y = &data[target].logits;
            let map = fit_ridge(&x[..fit_tokens * hidden], &y[..fit_tokens * experts], hidden, experts, args.ridge)
                .with_context(|| format!("fitting layer {from} to layer {target}"))?;
            let guess = top_k(&map.apply(&x[fit_tokens * hidden..]), experts, k);
            Ok((map, recall(&guess, &data[target].chosen[fit_tokens..])))
        };
        let fitted = |target: usize| fit(&data[from].inputs, target);
        let (map, linear) = fitted(to)?;
        // The hidden layer on top of the map, fitted to the same logits.
        let hidden_layer = (args.hidden > 0)
            .then(|| {
                let x = &data[from].inputs[..fit_tokens * hidden];
                let training =
                    Training { width: args.hidden as usize, epochs: args.epochs as usize, ..Training::default() };
                fit_hidden(x, &data[to].logits[..fit_tokens * experts], &map, training)
                    .with_context(|| format!("fitting layer {from}'s hidden layer to layer {to}"))
            })
            .transpose()?;
        let predictor = LayerPredictor { map, hidden: hidden_layer };
        let guess = top_k(&predictor.apply(&data[from].inputs[fit_tokens * hidden..]), experts, k);
        let learned = recall(&guess, &data[to].chosen[fit_tokens..]);
        // `to`'s own block input before its attention.
        let pre_attention = fit(&data[to].block_inputs, to)?.1;
        let two_ahead = match moe.get(i + 2) {
            Some(&after) => Some((after, fitted(after)?.1)),
            None => None,
        };
        let own = data[from]
            .predicted
            .iter()
            .any(|p| !p.is_empty())
            .then(|| recall(&data[from].predicted[fit_tokens..], &data[to].chosen[fit_tokens..]));
        let linear = predictor.hidden.is_some().then_some(linear);
        predictors.push((from, predictor));
        layers.push(PairReport { from, to, own, learned, linear, two_ahead, pre_attention });
    }
    write_predictor(&out, &predictors).with_context(|| format!("writing the predictor to {}", out.display()))?;

    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let report = FitReport {
        out: out.display().to_string(),
        fit_tokens,
        held_out_tokens: ids.len() - fit_tokens,
        own_predictor,
        mean_own: mean(layers.iter().filter_map(|l| l.own).collect()),
        mean_learned: mean(layers.iter().map(|l| l.learned).collect()).unwrap_or(0.0),
        mean_linear: mean(layers.iter().filter_map(|l| l.linear).collect()),
        mean_two_ahead: mean(layers.iter().filter_map(|l| l.two_ahead.map(|t| t.1)).collect()),
        mean_pre_attention: mean(layers.iter().map(|l| l.pre_attention).collect()).unwrap_or(0.0),
        layers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "fitted on {} tokens, recall of the top-{k} on the last {} (held out); wrote {}",
        report.fit_tokens, report.held_out_tokens, report.out
    );
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    println!(
        "{:>10} {:>14} {:>14} {:>14} {:>16} {:>14}",
        "layers", report.own_predictor, "learned", "map alone", "map 2-ahead", "pre-attention"
    );
    for l in &report.layers {
        println!(
            "{:>10} {:>14} {:>14} {:>14} {:>16} {:>14}",
            format!("{} -> {}", l.from, l.to),
            pct(l.own),
            pct(Some(l.learned)),
            pct(l.linear),
            l.two_ahead.map_or("-".to_string(), |(to, r)| format!("{:.1}% (-> {to})", 100.0 * r)),
            pct(Some(l.pre_attention))
        );
    }
    println!(
        "{:>10} {:>14} {:>14} {:>14} {:>16} {:>14}",
        "mean",
        pct(report.mean_own),
        pct(Some(report.mean_learned)),
        pct(report.mean_linear),
        pct(report.mean_two_ahead),
        pct(Some(report.mean_pre_attention))
    );
    Ok(())
}
