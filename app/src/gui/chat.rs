//! The conversation: turns, the reply streaming in token by token, and the input box.

use ferry_runtime::chat::Message;

/// One piece of a streamed reply, with the share of layers that treated its token as big
/// (big-little mode only).
pub struct Piece {
    pub text: String,
    pub big: Option<f32>,
}

pub struct Turn {
    pub role: &'static str,
    pub pieces: Vec<Piece>,
}

impl Turn {
    fn text(&self) -> String {
        self.pieces.iter().map(|p| p.text.as_str()).collect()
    }
}

/// What the user asked the chat pane to do.
pub enum ChatAction {
    Send,
    Stop,
    Regenerate,
    Clear,
}

#[derive(Default)]
pub struct Chat {
    pub system: String,
    pub turns: Vec<Turn>,
    pub input: String,
}

impl Chat {
    pub fn new(system: Option<String>) -> Self {
        Self { system: system.unwrap_or_default(), ..Self::default() }
    }

    /// The conversation as the chat template takes it.
    pub fn messages(&self) -> Vec<Message> {
        let system = (!self.system.trim().is_empty()).then(|| Message::new("system", self.system.trim()));
        system.into_iter().chain(self.turns.iter().map(|t| Message::new(t.role, t.text().trim()))).collect()
    }

    /// Moves the input into a user turn; false when there is nothing to send.
    pub fn submit(&mut self) -> bool {
        let text = self.input.trim().to_string();
        if text.is_empty() {
            return false;
        }
        self.input.clear();
        self.turns.push(Turn { role: "user", pieces: vec![Piece { text, big: None }] });
        true
    }

    /// Drops the last reply so that the same conversation can be answered again; false when
    /// the conversation does not end with a user turn once it is gone.
    pub fn drop_last_reply(&mut self) -> bool {
        if self.turns.last().is_some_and(|t| t.role == "assistant") {
            self.turns.pop();
        }
        self.turns.last().is_some_and(|t| t.role == "user")
    }

    /// Starts an empty assistant turn for a reply about to stream in.
    pub fn begin_reply(&mut self) {
        self.turns.push(Turn { role: "assistant", pieces: Vec::new() });
    }

    pub fn push_token(&mut self, text: String) {
        if let Some(turn) = self.turns.last_mut().filter(|t| t.role == "assistant") {
            turn.pieces.push(Piece { text, big: None });
        }
    }

    /// Marks the latest token with the share of layers that chose big for it.
    pub fn mark_big(&mut self, share: f32) {
        if let Some(piece) = self.turns.last_mut().filter(|t| t.role == "assistant").and_then(|t| t.pieces.last_mut()) {
            piece.big = Some(share);
        }
    }

    /// The reply being written (or the last one).
    pub fn last_reply(&self) -> String {
        self.turns.iter().rev().find(|t| t.role == "assistant").map(Turn::text).unwrap_or_default()
    }

    /// Draws the pane; `busy` while a reply streams in, `ready` once a model is loaded.
    pub fn view(&mut self, ui: &mut egui::Ui, busy: bool, ready: bool) -> Option<ChatAction> {
        let mut action = None;
        ui.horizontal(|ui| {
            ui.label("System prompt");
            ui.add(egui::TextEdit::singleline(&mut self.system).desired_width(f32::INFINITY));
        });
        ui.separator();
        let input_height = 90.0;
        egui::ScrollArea::vertical()
            .max_height((ui.available_height() - input_height).max(60.0))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                for turn in &self.turns {
                    let who = if turn.role == "user" { "You" } else { "Model" };
                    ui.label(egui::RichText::new(who).strong());
                    ui.label(layout(ui, turn));
                    ui.add_space(6.0);
                }
            });
        ui.separator();
        let edit = ui.add_enabled(
            ready && !busy,
            egui::TextEdit::multiline(&mut self.input)
                .hint_text("Message (Enter sends, Shift+Enter for a new line)")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        let enter = edit.has_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter) && !i.modifiers.shift);
        ui.horizontal(|ui| {
            if ui.add_enabled(ready && !busy, egui::Button::new("Send")).clicked() || (enter && ready && !busy) {
                action = Some(ChatAction::Send);
            }
            if ui.add_enabled(busy, egui::Button::new("Stop")).clicked() {
                action = Some(ChatAction::Stop);
            }
            if ui.add_enabled(ready && !busy && !self.turns.is_empty(), egui::Button::new("Regenerate")).clicked() {
                action = Some(ChatAction::Regenerate);
            }
            if ui.add_enabled(!busy, egui::Button::new("Clear")).clicked() {
                action = Some(ChatAction::Clear);
            }
        });
        action
    }
}

/// A turn's text; in big-little mode each token is tinted by how big it was.
fn layout(ui: &egui::Ui, turn: &Turn) -> egui::text::LayoutJob {
    let mut job = egui::text::LayoutJob::default();
    let color = ui.visuals().text_color();
    let font = egui::TextStyle::Body.resolve(ui.style());
    for piece in &turn.pieces {
        let mut format = egui::TextFormat { font_id: font.clone(), color, ..Default::default() };
        if let Some(share) = piece.big {
            format.background = egui::Color32::from_rgba_unmultiplied(230, 140, 30, (40.0 + 140.0 * share) as u8);
        }
        job.append(&piece.text, 0.0, format);
    }
    job.wrap.max_width = ui.available_width();
    job
}
