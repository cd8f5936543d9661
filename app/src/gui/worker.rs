//! The engine's own thread: loading, generation and reconfiguration never run on the UI thread.
//! The UI sends `Command`s; the worker answers with `Update`s and wakes the UI after each one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use ferry_runtime::chat::Message;
use ferry_runtime::engine::{Engine, Event, GenerateRequest, GenerateStats, Generation, StepStats};
use ferry_runtime::experts::Residency;
use ferry_runtime::options::ExpertOptions;
use ferry_runtime::sampling::SamplingConfig;

use crate::load::{self, Source};

pub enum Command {
    Load(Source),
    Generate(Box<Reply>),
    /// New expert settings, applied between forward passes (also mid-reply).
    Configure(ExpertOptions),
}

/// One assistant reply to a conversation.
pub struct Reply {
    pub messages: Vec<Message>,
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
}

/// What the loaded model is, for the status bar and the residency map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub folder: PathBuf,
    pub family: String,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    /// The engine's adapter, one line.
    pub adapter: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    pub has_chat_template: bool,
    /// Bytes of all routed experts, as stored (`--expert-dtype`).
    pub expert_bytes_total: u64,
    pub expert_dtype: String,
}

pub enum Update {
    Loading(String),
    Loaded(Box<ModelInfo>),
    LoadFailed(String),
    Token(String),
    Step(Box<StepUpdate>),
    Finished(Box<GenerateStats>),
    Failed(String),
    /// The result of a `Configure`: what is now in force, or why it was refused.
    Configured(Result<String, String>),
}

/// One forward pass as the UI shows it.
pub struct StepUpdate {
    pub stats: StepStats,
    pub residency: Residency,
    /// Pre-gating in this pass: (real choices that were predicted, real choices).
    pub recall: (u64, u64),
}

/// Sends updates and wakes the UI so it repaints at once.
struct Outbox {
    tx: mpsc::Sender<Update>,
    ctx: egui::Context,
}

impl Outbox {
    fn send(&self, update: Update) {
        // The UI has gone away when this fails; the worker ends at its next receive.
        let _ = self.tx.send(update);
        self.ctx.request_repaint();
    }
}

/// The UI's handle on the worker thread.
pub struct Worker {
    commands: Option<mpsc::Sender<Command>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn start(ctx: egui::Context) -> std::io::Result<(Self, mpsc::Receiver<Update>)> {
        let (commands, inbox) = mpsc::channel();
        let (tx, updates) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name("ferry-engine".into())
            .spawn(move || run(&inbox, &Outbox { tx, ctx }, &stop))?;
        Ok((Self { commands: Some(commands), cancel, thread: Some(thread) }, updates))
    }

    pub fn send(&self, command: Command) {
        if let Command::Generate(_) = command {
            self.cancel.store(false, Ordering::Relaxed);
        }
        if let Some(tx) = &self.commands {
            let _ = tx.send(command);
        }
    }

    /// Ends the reply being generated before its next forward pass.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(inbox: &mpsc::Receiver<Command>, out: &Outbox, cancel: &AtomicBool) {
    let mut engine: Option<Engine> = None;
    // Commands that arrived while a reply was being generated.
    let mut pending: VecDeque<Command> = VecDeque::new();
    loop {
        let command = match pending.pop_front() {
            Some(c) => c,
            None => match inbox.recv() {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        match command {
            Command::Load(source) => {
                // Free the old model's GPU memory before uploading the next one.
                engine = None;
                match load::engine_from(&source, true, |stage| out.send(Update::Loading(stage.to_string()))) {
                    Ok(loaded) => {
                        out.send(Update::Loaded(Box::new(describe(&source, &loaded))));
                        engine = Some(loaded.engine);
                    }
                    Err(err) => out.send(Update::LoadFailed(format!("{}: {err:#}", source.folder.display()))),
                }
            }
            Command::Configure(options) => out.send(Update::Configured(configure(engine.as_mut(), options))),
            Command::Generate(reply) => match &mut engine {
                Some(engine) => {
                    if let Err(err) = generate(engine, &reply, inbox, &mut pending, out, cancel) {
                        out.send(Update::Failed(format!("{err:#}")));
                    }
                }
                None => out.send(Update::Failed("no model is loaded".into())),
            },
        }
    }
}

fn describe(source: &Source, loaded: &load::Loaded) -> ModelInfo {
    let spec = loaded.engine.model.spec();
    let expert_bytes = loaded.engine.model.experts().plan().slot_bytes;
    let routed: usize = loaded.engine.model.experts().usage().iter().map(Vec::len).sum();
    ModelInfo {
        folder: source.folder.clone(),
        family: spec.family.clone(),
        layers: spec.num_layers(),
        experts: spec.moe.num_experts,
        top_k: spec.moe.top_k,
        adapter: loaded.gpu.describe(),
        backend: loaded.gpu.adapter.backend.clone(),
        has_chat_template: loaded.engine.tokenizer.as_ref().is_some_and(|t| t.has_chat_template()),
        expert_bytes_total: expert_bytes * routed as u64,
        expert_dtype: loaded.engine.model.experts().dtype().to_string(),
    }
}

fn configure(engine: Option<&mut Engine>, options: ExpertOptions) -> Result<String, String> {
    let engine = engine.ok_or("no model is loaded")?;
    engine.model.set_expert_options(options).map_err(|e| e.to_string())?;
    let experts = engine.model.experts();
    let plan = experts.plan();
    Ok(format!("{} expert slots ({} MiB), {}", plan.slots, plan.gpu_bytes() >> 20, experts.policy()))
}

/// Real (token, expert) choices predicted so far and all scored, over every layer.
fn recall_totals(engine: &Engine) -> (u64, u64) {
    engine.model.experts().recall().iter().fold((0, 0), |(p, a), r| (p + r.predicted, a + r.actual))
}

/// Steps the reply's generation itself: between two forward passes it sends the step's
/// residency, applies settings that arrived and honours the stop button.
fn generate(
    engine: &mut Engine,
    reply: &Reply,
    inbox: &mpsc::Receiver<Command>,
    pending: &mut VecDeque<Command>,
    out: &Outbox,
    cancel: &AtomicBool,
) -> anyhow::Result<()> {
    let tokenizer =
        engine.tokenizer.as_ref().ok_or_else(|| anyhow::anyhow!("the model folder has no tokenizer.json"))?;
    let context = engine.model.spec().max_position_embeddings;
    let prompt_ids = if tokenizer.has_chat_template() {
        tokenizer.encode_chat_within(&reply.messages, context)?
    } else {
        // Without a template the turns are plain text, one per line.
        let text: Vec<&str> = reply.messages.iter().map(|m| m.content.as_str()).collect();
        tokenizer.encode_within(&text.join("\n"), true, context)?
    };
    let request = GenerateRequest {
        prompt_ids,
        max_new_tokens: reply.max_new_tokens,
        sampling: reply.sampling.clone(),
        stop_strings: Vec::new(),
        stop_at_eos: true,
    };
    let mut recall_before = recall_totals(engine);
    let mut generation = Generation::new(&engine.model, request)?;
    while !generation.is_finished() {
        let events = if generation.started() && cancel.load(Ordering::Relaxed) {
            generation.cancel(&engine.model)
        } else {
            generation.step(&mut engine.model, engine.tokenizer.as_ref())?
        };
        for event in events {
            match event {
                Event::Token { text, .. } => out.send(Update::Token(text)),
                Event::Step(stats) => {
                    let residency = engine.model.experts_mut().residency();
                    let recall_now = recall_totals(engine);
                    let recall = (recall_now.0 - recall_before.0, recall_now.1 - recall_before.1);
                    recall_before = recall_now;
                    out.send(Update::Step(Box::new(StepUpdate { stats: *stats, residency, recall })));
                }
                Event::Finished(stats) => out.send(Update::Finished(stats)),
            }
        }
        // Between forward passes the cache is free: settings changed mid-reply apply now.
        while let Ok(command) = inbox.try_recv() {
            match command {
                Command::Configure(options) => out.send(Update::Configured(configure(Some(engine), options))),
                other => pending.push_back(other),
            }
        }
    }
    Ok(())
}
