//! `ferry gui`: the desktop app (eframe/egui on wgpu). Chat on the left, the residency map and
//! throughput plots in the middle, settings on the right; the engine runs on its own thread
//! (`worker`) and streams updates, so the UI never waits on it.

mod chat;
mod controls;
mod residency_map;
mod script;
mod throughput;
mod worker;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::args::{ExpertDtypeChoice, GuiArgs};
use crate::load::{self, Source};
use chat::{Chat, ChatAction};
use controls::Controls;
use residency_map::ResidencyView;
use script::{Script, ScriptReport};
use throughput::Throughput;
use worker::{Command, ModelInfo, Reply, Update, Worker};

pub fn run(args: GuiArgs) -> Result<()> {
    let folder = load::model_folder(&args.model)?;
    let source = Source {
        folder,
        adapter: args.model.adapter,
        options: load::expert_options(&args.model)?,
        lut_cache: args.model.lut_cache.0,
    };
    let script = args.script_prompt.clone().map(|prompt| {
        Script::new(prompt, args.screenshot.clone(), args.state_out.clone(), Duration::from_secs(args.script_timeout))
    });
    let outcome = script.as_ref().map(|s| std::sync::Arc::clone(&s.outcome));
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("Ferry").with_inner_size([1280.0, 800.0]),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    let system = args.system.clone();
    let max_new_tokens = args.max_new_tokens;
    let dtype_flag = args.model.expert_dtype;
    eframe::run_native(
        "Ferry",
        options,
        Box::new(move |cc| {
            let app = FerryApp::new(&cc.egui_ctx, source, dtype_flag, system, max_new_tokens, script)?;
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the desktop window could not be opened: {e}"))?;
    if let Some(outcome) = outcome {
        let report = outcome.lock().map_err(|_| anyhow::anyhow!("script state poisoned"))?.clone();
        match report {
            Some(ScriptReport { error: Some(error), .. }) => anyhow::bail!("scripted run failed: {error}"),
            Some(_) => {}
            None => anyhow::bail!("the window closed before the scripted run finished"),
        }
    }
    Ok(())
}

enum ModelState {
    Loading { stage: String, since: Instant },
    Ready(Box<ModelInfo>),
    Failed(String),
}

struct FerryApp {
    worker: Worker,
    updates: mpsc::Receiver<Update>,
    source: Source,
    /// `--expert-dtype` as given: `auto` is resolved again for each folder opened.
    dtype_flag: ExpertDtypeChoice,
    folder_input: String,
    model: ModelState,
    chat: Chat,
    controls: Controls,
    residency: ResidencyView,
    throughput: Throughput,
    /// A reply is being generated.
    busy: bool,
    /// The last generation error, shown above the input.
    reply_error: Option<String>,
    tokens_received: usize,
    steps: usize,
    frames: u64,
    /// The adapter egui renders with.
    ui_adapter: Option<String>,
    script: Option<Script>,
}

impl FerryApp {
    fn new(
        ctx: &egui::Context,
        source: Source,
        dtype_flag: ExpertDtypeChoice,
        system: Option<String>,
        max_new_tokens: usize,
        script: Option<Script>,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let (worker, updates) = Worker::start(ctx.clone())?;
        worker.send(Command::Load(source.clone()));
        Ok(Self {
            worker,
            updates,
            folder_input: source.folder.display().to_string(),
            dtype_flag,
            controls: Controls::new(source.options, max_new_tokens),
            source,
            model: ModelState::Loading { stage: "starting".into(), since: Instant::now() },
            chat: Chat::new(system),
            residency: ResidencyView::default(),
            throughput: Throughput::default(),
            busy: false,
            reply_error: None,
            tokens_received: 0,
            steps: 0,
            frames: 0,
            ui_adapter: None,
            script,
        })
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Loading(stage) => {
                if let ModelState::Loading { stage: s, .. } = &mut self.model {
                    *s = stage;
                }
            }
            Update::Loaded(info) => self.model = ModelState::Ready(info),
            Update::LoadFailed(error) => self.model = ModelState::Failed(error),
            Update::Token(text) => {
                self.tokens_received += 1;
                self.chat.push_token(text);
            }
            Update::Step(step) => {
                self.steps += 1;
                self.throughput.record(&step.stats, step.recall);
                // A decode step is the forward pass of the token just streamed.
                if step.stats.step > 0 && !step.residency.big.is_empty() {
                    let layers: Vec<&Vec<bool>> = step.residency.big.iter().filter(|l| !l.is_empty()).collect();
                    let big = layers.iter().filter(|l| l.last().copied().unwrap_or(false)).count();
                    self.chat.mark_big(big as f32 / layers.len().max(1) as f32);
                }
                self.residency.update(step.residency);
            }
            Update::Finished(stats) => {
                self.busy = false;
                self.throughput.finish(*stats);
            }
            Update::Failed(error) => {
                self.busy = false;
                self.reply_error = Some(error);
            }
            Update::Configured(result) => {
                if result.is_ok() {
                    self.controls.dirty = false;
                }
                self.controls.status = Some(result);
            }
        }
    }

    fn send_reply(&mut self) {
        self.reply_error = None;
        self.chat.begin_reply();
        let mut messages = self.chat.messages();
        // The empty assistant turn just begun is where the reply goes, not part of the prompt.
        messages.pop();
        self.worker.send(Command::Generate(Box::new(Reply {
            messages,
            sampling: self.controls.sampling.clone(),
            max_new_tokens: self.controls.max_new_tokens,
        })));
        self.busy = true;
    }

    fn on_chat(&mut self, action: ChatAction) {
        match action {
            ChatAction::Send => {
                if self.chat.submit() {
                    self.send_reply();
                }
            }
            ChatAction::Stop => self.worker.stop(),
            ChatAction::Regenerate => {
                if self.chat.drop_last_reply() {
                    self.send_reply();
                }
            }
            ChatAction::Clear => {
                self.chat.turns.clear();
                self.reply_error = None;
            }
        }
    }

    fn open_folder(&mut self) {
        let folder = PathBuf::from(self.folder_input.trim());
        // An MXFP4 or pre-quantised folder keeps its format under `--expert-dtype auto`.
        let dtype = match load::resolve_expert_dtype(self.dtype_flag, &folder) {
            Ok(dtype) => dtype,
            Err(error) => {
                self.model = ModelState::Failed(format!("{error:#}"));
                return;
            }
        };
        self.source.folder = folder;
        self.controls.set_expert_dtype(dtype);
        match self.controls.expert_options() {
            Ok(options) => self.source.options = options,
            Err(error) => {
                self.model = ModelState::Failed(error);
                return;
            }
        }
        self.residency.clear();
        self.chat.turns.clear();
        self.model = ModelState::Loading { stage: "starting".into(), since: Instant::now() };
        self.worker.send(Command::Load(self.source.clone()));
    }

    fn report(&self) -> ScriptReport {
        let (adapter, backend) = match &self.model {
            ModelState::Ready(info) => (Some(info.adapter.clone()), Some(info.backend.clone())),
            _ => (None, None),
        };
        let resident = self.residency.latest.as_ref().map_or(0, |r| {
            r.layers.iter().flatten().filter(|c| c.state != ferry_runtime::experts::SlotState::Host).count()
        });
        ScriptReport {
            model_loaded: matches!(self.model, ModelState::Ready(_)),
            adapter,
            backend,
            ui_adapter: self.ui_adapter.clone(),
            tokens_received: self.tokens_received,
            reply: self.chat.last_reply(),
            steps: self.steps,
            residency_changes: self.residency.changes,
            resident_experts: resident,
            frames: self.frames,
            screenshot: None,
            error: None,
            conversation_turns: self.chat.messages().iter().filter(|m| m.role != "system").count(),
        }
    }

    fn run_script(&mut self, ctx: &egui::Context) {
        let Some(mut script) = self.script.take() else { return };
        let failed = match &self.model {
            ModelState::Failed(error) => Some(error.clone()),
            _ => self.reply_error.clone(),
        };
        let loaded = matches!(self.model, ModelState::Ready(_));
        match script.advance(ctx, self.report(), loaded, self.busy, failed) {
            script::Step::SendPrompt => {
                self.chat.input = script.prompt.clone();
                self.on_chat(ChatAction::Send);
            }
            script::Step::Quit => ctx.send_viewport_cmd(egui::ViewportCommand::Close),
            script::Step::Nothing => {}
        }
        self.script = Some(script);
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label("Model folder");
            ui.add(egui::TextEdit::singleline(&mut self.folder_input).desired_width(ui.available_width() - 90.0));
            let loading = matches!(self.model, ModelState::Loading { .. });
            if ui.add_enabled(!self.busy && !loading, egui::Button::new("Open")).clicked() {
                self.open_folder();
            }
        });
        match &self.model {
            ModelState::Loading { stage, since } => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!("Loading: {stage} ({:.1} s)", since.elapsed().as_secs_f32()));
                });
                ui.ctx().request_repaint_after(Duration::from_millis(100));
            }
            ModelState::Failed(error) => {
                egui::Frame::group(ui.style()).fill(ui.visuals().extreme_bg_color).show(ui, |ui| {
                    ui.colored_label(ui.visuals().error_fg_color, format!("Could not open the model: {error}"));
                });
            }
            ModelState::Ready(_) => {}
        }
    }

    fn status_bar(&self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| match &self.model {
            ModelState::Ready(info) => {
                ui.label(format!("Engine GPU: {} - backend {}", info.adapter, info.backend));
                ui.separator();
                ui.label(format!(
                    "{} · {} layers · {} experts, top-{} · {:.1} MiB of {} experts",
                    info.family,
                    info.layers,
                    info.experts,
                    info.top_k,
                    info.expert_bytes_total as f64 / (1 << 20) as f64,
                    info.expert_dtype
                ));
                if let Some(ui_adapter) = &self.ui_adapter {
                    ui.separator();
                    ui.label(format!("UI: {ui_adapter}"));
                }
            }
            _ => {
                ui.label("No model loaded");
            }
        });
    }
}

impl eframe::App for FerryApp {
    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        if self.ui_adapter.is_none() {
            self.ui_adapter = frame.wgpu_render_state().map(|rs| {
                let info = rs.adapter.get_info();
                format!("{} ({:?})", info.name, info.backend)
            });
        }
        while let Ok(update) = self.updates.try_recv() {
            self.apply(update);
        }
        self.run_script(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frames += 1;
        egui::Panel::top("model").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::right("controls").default_size(300.0).show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                if self.controls.view(ui) {
                    match self.controls.expert_options() {
                        Ok(options) => self.worker.send(Command::Configure(options)),
                        Err(error) => self.controls.status = Some(Err(error)),
                    }
                }
            });
        });
        egui::Panel::left("chat").default_size(420.0).show(ui, |ui| {
            let ready = matches!(self.model, ModelState::Ready(_));
            if let Some(error) = &self.reply_error {
                ui.colored_label(ui.visuals().error_fg_color, error);
            }
            if let Some(action) = self.chat.view(ui, self.busy, ready) {
                self.on_chat(action);
            }
        });
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Expert residency");
            egui::ScrollArea::vertical().id_salt("residency").max_height(ui.available_height() * 0.5).show(ui, |ui| {
                self.residency.view(ui);
            });
            ui.separator();
            ui.heading("Throughput");
            self.throughput.view(ui);
        });
    }
}
