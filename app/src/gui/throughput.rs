//! Live throughput: per-step figures of the last `WINDOW` decode steps, plotted, and the totals
//! of the latest reply.

use std::collections::VecDeque;

use egui_plot::{Line, Plot, PlotPoints};
use ferry_runtime::engine::{GenerateStats, StepStats};

/// Decode steps kept for the plots.
const WINDOW: usize = 200;

/// One decode step's figures.
#[derive(Debug, Clone, Copy)]
struct Point {
    /// Steps since the app started (x axis).
    step: f64,
    tokens_per_second: f64,
    upload_mb_per_second: f64,
    hit_rate: f64,
    stall_fraction: f64,
    /// Share of the step the host expert kernel ran (`--miss-policy cpu|auto`).
    host_fraction: f64,
    /// Pre-gating recall of this step; None when nothing was predicted.
    recall: Option<f64>,
}

#[derive(Default)]
pub struct Throughput {
    points: VecDeque<Point>,
    steps: u64,
    /// The latest reply's totals, once it has finished.
    pub last: Option<GenerateStats>,
    /// Prompt tokens of the reply being generated and the prefill's rate.
    prefill: Option<(usize, f64)>,
    /// Totals over every reply since the app started.
    pub tokens: u64,
    pub bytes_uploaded: u64,
}

impl Throughput {
    /// Adds one forward pass; the prompt's pass (step 0) counts for the prefill only.
    pub fn record(&mut self, stats: &StepStats, recall: (u64, u64)) {
        let seconds = stats.seconds.max(1e-9);
        self.bytes_uploaded += stats.experts.bytes_uploaded + stats.lookup.bytes_uploaded;
        if stats.step == 0 {
            self.prefill = Some((stats.tokens, stats.tokens as f64 / seconds));
            return;
        }
        self.steps += 1;
        if self.points.len() == WINDOW {
            self.points.pop_front();
        }
        self.points.push_back(Point {
            step: self.steps as f64,
            tokens_per_second: stats.tokens as f64 / seconds,
            upload_mb_per_second: (stats.experts.bytes_uploaded + stats.lookup.bytes_uploaded) as f64 / seconds / 1e6,
            hit_rate: stats.experts.hit_rate(),
            stall_fraction: (stats.experts.stall_seconds / seconds).min(1.0),
            host_fraction: (stats.experts.host_seconds / seconds).min(1.0),
            recall: (recall.1 > 0).then(|| recall.0 as f64 / recall.1 as f64),
        });
    }

    pub fn finish(&mut self, stats: GenerateStats) {
        // Counted from the reply's totals: decode steps are one fewer than tokens, or as many
        // when the reply stopped at EOS or was cancelled.
        self.tokens += stats.new_tokens as u64;
        self.last = Some(stats);
    }

    pub fn view(&self, ui: &mut egui::Ui) {
        match &self.last {
            Some(s) => ui.label(format!(
                "last reply: {} tokens, time to first token {:.0} ms, prefill {:.0} tok/s, decode {:.1} tok/s, hit rate {:.0}%, {:.2} MiB uploaded, {} experts computed on the host, stopped: {:?}",
                s.new_tokens,
                s.time_to_first_token_seconds * 1e3,
                s.prefill_tokens_per_second,
                s.decode_tokens_per_second,
                s.decode_experts.hit_rate() * 100.0,
                (s.prefill_experts.bytes_uploaded + s.decode_experts.bytes_uploaded) as f64 / (1 << 20) as f64,
                s.prefill_experts.host_computed + s.decode_experts.host_computed,
                s.stop_reason,
            )),
            None => match self.prefill {
                Some((tokens, rate)) => ui.label(format!("prompt: {tokens} tokens at {rate:.0} tok/s")),
                None => ui.label("No reply yet."),
            },
        };
        ui.label(format!(
            "since start: {} tokens, {:.1} MiB uploaded to expert slots and lookup rows",
            self.tokens,
            self.bytes_uploaded as f64 / (1 << 20) as f64
        ));
        let series = |f: fn(&Point) -> Option<f64>| -> Vec<[f64; 2]> {
            self.points.iter().filter_map(|p| f(p).map(|y| [p.step, y])).collect()
        };
        let height = ((ui.available_height() - 40.0) / 3.0).clamp(60.0, 160.0);
        plot(ui, "tokens", height, vec![("decode tok/s", series(|p| Some(p.tokens_per_second)))]);
        plot(ui, "upload", height, vec![("upload MB/s", series(|p| Some(p.upload_mb_per_second)))]);
        plot(
            ui,
            "rates",
            height,
            vec![
                ("hit rate", series(|p| Some(p.hit_rate))),
                ("stall fraction", series(|p| Some(p.stall_fraction))),
                ("host expert fraction", series(|p| Some(p.host_fraction))),
                ("prefetch recall", series(|p| p.recall)),
            ],
        );
    }
}

fn plot(ui: &mut egui::Ui, id: &str, height: f32, lines: Vec<(&str, Vec<[f64; 2]>)>) {
    Plot::new(id)
        .height(height)
        .legend(egui_plot::Legend::default())
        .include_y(0.0)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .show(ui, |plot_ui| {
            for (name, points) in lines {
                plot_ui.line(Line::new(name, PlotPoints::from(points)));
            }
        });
}
