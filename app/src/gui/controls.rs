//! The settings panel: expert management (applied to the running engine) and sampling (used by
//! the next reply).

use ferry_runtime::options::{
    BigFallback, BigLittle, EvictionPolicy, ExpertOptions, Importance, MissPolicy, PrefetchMode, VramBudget,
};
use ferry_runtime::sampling::SamplingConfig;
use strum::IntoEnumIterator;

pub struct Controls {
    /// Every expert resident (else `budget_percent` of expert bytes).
    pub all_resident: bool,
    pub budget_percent: f32,
    pub policy: EvictionPolicy,
    /// Upload missed experts, or compute them on the host.
    pub miss_policy: MissPolicy,
    pub pregate: bool,
    pub big_little: bool,
    pub big_fraction: f32,
    pub importance: Importance,
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    /// Settings that have not been sent to the engine yet.
    pub dirty: bool,
    /// The engine's answer to the last change.
    pub status: Option<Result<String, String>>,
    /// A `--vram-budget` in bytes, kept until the budget controls are touched.
    given_bytes: Option<VramBudget>,
    /// Everything `ExpertOptions` holds that the panel does not show (link, page size).
    base: ExpertOptions,
}

impl Controls {
    pub fn new(options: ExpertOptions, max_new_tokens: usize) -> Self {
        let (all_resident, budget_percent) = match options.budget {
            VramBudget::FractionOfExperts(share) => (false, (share * 100.0) as f32),
            VramBudget::Bytes(_) => (false, 25.0),
            VramBudget::All => (true, 25.0),
        };
        let big = options.big_little;
        Self {
            all_resident,
            budget_percent,
            policy: options.policy,
            miss_policy: options.miss_policy,
            pregate: options.prefetch != PrefetchMode::None,
            big_little: big.is_some(),
            big_fraction: big.map_or(0.3, |b| b.big_fraction),
            importance: big.map_or(Importance::default(), |b| b.importance),
            sampling: SamplingConfig::greedy(),
            max_new_tokens,
            dirty: false,
            status: None,
            given_bytes: matches!(options.budget, VramBudget::Bytes(_)).then_some(options.budget),
            base: options,
        }
    }

    /// The format experts load in; set when a folder is opened (it needs a reload to change).
    pub fn set_expert_dtype(&mut self, dtype: ferry_runtime::options::ExpertDtype) {
        self.base.expert_dtype = dtype;
    }

    /// The expert settings as the engine takes them.
    pub fn expert_options(&self) -> Result<ExpertOptions, String> {
        let budget = match self.given_bytes {
            Some(given) => given,
            None if self.all_resident => VramBudget::All,
            None => VramBudget::FractionOfExperts(f64::from(self.budget_percent) / 100.0),
        };
        let big_little = if self.big_little {
            Some(BigLittle {
                importance: self.importance,
                big_fraction: self.big_fraction,
                fallback: self.base.big_little.map_or(BigFallback::Fetch, |b| b.fallback),
            })
        } else {
            None
        };
        Ok(ExpertOptions {
            budget,
            policy: self.policy,
            miss_policy: self.miss_policy,
            // The checkbox keeps the predictor the app was started with (`--prefetch learned`).
            prefetch: match (self.pregate, self.base.prefetch) {
                (false, _) => PrefetchMode::None,
                (true, PrefetchMode::Learned) => PrefetchMode::Learned,
                (true, _) => PrefetchMode::Pregate,
            },
            big_little,
            ..self.base
        })
    }

    /// Draws the panel; true when the user asked to apply the expert settings.
    pub fn view(&mut self, ui: &mut egui::Ui) -> bool {
        ui.heading("Experts");
        let mut budget_changed = ui.checkbox(&mut self.all_resident, "all experts resident").changed();
        ui.add_enabled_ui(!self.all_resident, |ui| {
            let slider = egui::Slider::new(&mut self.budget_percent, 1.0..=99.0).suffix("% of expert bytes");
            budget_changed |= ui.add(slider.text("VRAM budget")).changed();
        });
        if let Some(VramBudget::Bytes(bytes)) = self.given_bytes {
            ui.label(format!("budget from the command line: {} MiB in all", bytes >> 20));
        }
        if budget_changed {
            self.given_bytes = None;
        }
        let mut changed = budget_changed;
        egui::ComboBox::from_label("eviction policy").selected_text(self.policy.to_string()).show_ui(ui, |ui| {
            for policy in EvictionPolicy::iter() {
                changed |= ui.selectable_value(&mut self.policy, policy, policy.to_string()).changed();
            }
        });
        egui::ComboBox::from_label("missed experts").selected_text(self.miss_policy.to_string()).show_ui(ui, |ui| {
            for miss in MissPolicy::iter() {
                let text = match miss {
                    MissPolicy::Upload => "upload (exact)",
                    MissPolicy::Cpu => "cpu (computed on the host)",
                    MissPolicy::Auto => "auto (cheaper of the two)",
                };
                changed |= ui.selectable_value(&mut self.miss_policy, miss, text).changed();
            }
        });
        changed |= ui.checkbox(&mut self.pregate, "pre-gating (prefetch the next layer)").changed();
        changed |= ui.checkbox(&mut self.big_little, "big-little experts (approximate)").changed();
        ui.add_enabled_ui(self.big_little, |ui| {
            changed |= ui.add(egui::Slider::new(&mut self.big_fraction, 0.0..=1.0).text("big fraction")).changed();
            egui::ComboBox::from_label("importance").selected_text(self.importance.to_string()).show_ui(ui, |ui| {
                for importance in Importance::iter() {
                    changed |= ui.selectable_value(&mut self.importance, importance, importance.to_string()).changed();
                }
            });
        });
        self.dirty |= changed;
        let apply = ui.add_enabled(self.dirty, egui::Button::new("Apply to the running engine")).clicked();
        match &self.status {
            Some(Ok(text)) => {
                ui.label(text);
            }
            Some(Err(text)) => {
                ui.colored_label(ui.visuals().error_fg_color, text);
            }
            None => {}
        }
        ui.separator();
        ui.heading("Sampling");
        let s = &mut self.sampling;
        ui.add(egui::Slider::new(&mut s.temperature, 0.0..=2.0).text("temperature (0: greedy)"));
        ui.add(egui::Slider::new(&mut s.top_p, 0.01..=1.0).text("top-p"));
        ui.add(egui::Slider::new(&mut s.top_k, 0..=200).text("top-k (0: off)"));
        ui.add(egui::Slider::new(&mut s.min_p, 0.0..=1.0).text("min-p"));
        ui.add(egui::Slider::new(&mut s.repetition_penalty, 0.5..=2.0).text("repetition penalty"));
        ui.add(egui::Slider::new(&mut self.max_new_tokens, 1..=1024).text("max new tokens"));
        ui.horizontal(|ui| {
            ui.label("seed");
            ui.add(egui::DragValue::new(&mut s.seed));
        });
        apply
    }
}
