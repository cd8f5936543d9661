//! A scripted session (`ferry gui --script-prompt`): send one prompt once the model is loaded,
//! and when the reply is done save a screenshot and the app's state, then quit. The headless
//! test drives the app this way under Xvfb.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames drawn after the reply, so the screenshot shows the final state.
const SETTLE_FRAMES: u32 = 3;

/// What a scripted run reports at its end (written as JSON by --state-out).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScriptReport {
    pub model_loaded: bool,
    pub adapter: Option<String>,
    pub backend: Option<String>,
    /// The adapter egui draws with.
    pub ui_adapter: Option<String>,
    pub tokens_received: usize,
    pub reply: String,
    pub steps: usize,
    /// Steps after which the residency map showed a different state for some expert.
    pub residency_changes: u64,
    pub resident_experts: usize,
    pub frames: u64,
    pub screenshot: Option<PathBuf>,
    pub error: Option<String>,
    /// Turns in the chat (the prompt and replies), so a failed reply can be seen to keep them.
    pub conversation_turns: usize,
}

enum Phase {
    WaitingForModel,
    Replying,
    Settling(u32),
    WaitingForScreenshot,
    Done,
}

pub struct Script {
    pub prompt: String,
    screenshot: Option<PathBuf>,
    state_out: Option<PathBuf>,
    deadline: Instant,
    phase: Phase,
    /// Set by the screenshot callback (another thread): the file written, or why not.
    shot: Arc<Mutex<Option<Result<PathBuf, String>>>>,
    /// Shared with `gui::run`, which turns a failed script into a failed exit.
    pub outcome: Arc<Mutex<Option<ScriptReport>>>,
}

/// What the app should do next for the script.
pub enum Step {
    Nothing,
    SendPrompt,
    Quit,
}

impl Script {
    pub fn new(prompt: String, screenshot: Option<PathBuf>, state_out: Option<PathBuf>, timeout: Duration) -> Self {
        Self {
            prompt,
            screenshot,
            state_out,
            deadline: Instant::now() + timeout,
            phase: Phase::WaitingForModel,
            shot: Arc::new(Mutex::new(None)),
            outcome: Arc::new(Mutex::new(None)),
        }
    }

    /// Advances once per frame. `report` is the app's state now; `loaded`/`replying` say where
    /// the app stands; `failed` is an error shown by the app (load or generation).
    pub fn advance(
        &mut self,
        ctx: &egui::Context,
        report: ScriptReport,
        loaded: bool,
        replying: bool,
        failed: Option<String>,
    ) -> Step {
        if matches!(self.phase, Phase::Done) {
            return Step::Nothing;
        }
        if let Some(error) = failed {
            return self.finish(report, Some(error));
        }
        if Instant::now() > self.deadline {
            return self.finish(report, Some("the scripted run timed out".into()));
        }
        ctx.request_repaint_after(Duration::from_millis(50));
        match self.phase {
            Phase::WaitingForModel if loaded => {
                self.phase = Phase::Replying;
                Step::SendPrompt
            }
            Phase::Replying if !replying => {
                self.phase = Phase::Settling(SETTLE_FRAMES);
                Step::Nothing
            }
            Phase::Settling(0) => match &self.screenshot {
                Some(_) => {
                    let shot = Arc::clone(&self.shot);
                    let path = self.screenshot.clone().unwrap_or_default();
                    let waker = ctx.clone();
                    ctx.request_screenshot(move |image| {
                        let result = save_png(&path, &image).map(|()| path.clone());
                        if let Ok(mut slot) = shot.lock() {
                            *slot = Some(result);
                        }
                        waker.request_repaint();
                    });
                    self.phase = Phase::WaitingForScreenshot;
                    Step::Nothing
                }
                None => self.finish(report, None),
            },
            Phase::Settling(n) => {
                self.phase = Phase::Settling(n - 1);
                Step::Nothing
            }
            Phase::WaitingForScreenshot => {
                let taken = self.shot.lock().ok().and_then(|mut s| s.take());
                match taken {
                    Some(Ok(path)) => {
                        let mut report = report;
                        report.screenshot = Some(path);
                        self.finish(report, None)
                    }
                    Some(Err(error)) => self.finish(report, Some(error)),
                    None => Step::Nothing,
                }
            }
            _ => Step::Nothing,
        }
    }

    fn finish(&mut self, mut report: ScriptReport, error: Option<String>) -> Step {
        report.error = error;
        if let Some(path) = &self.state_out {
            let written = serde_json::to_string_pretty(&report).map_err(|e| e.to_string()).and_then(|json| {
                std::fs::write(path, json).map_err(|e| format!("--state-out {}: {e}", path.display()))
            });
            if let Err(e) = written {
                report.error.get_or_insert(e);
            }
        }
        if let Ok(mut outcome) = self.outcome.lock() {
            *outcome = Some(report);
        }
        self.phase = Phase::Done;
        Step::Quit
    }
}

fn save_png(path: &PathBuf, image: &egui::ColorImage) -> Result<(), String> {
    let [width, height] = image.size;
    let bytes: Vec<u8> = image.pixels.iter().flat_map(|p| p.to_array()).collect();
    let buffer = image::RgbaImage::from_raw(width as u32, height as u32, bytes)
        .ok_or_else(|| format!("--screenshot: a {width}x{height} image with the wrong number of pixels"))?;
    buffer.save(path).map_err(|e| format!("--screenshot {}: {e}", path.display()))
}
