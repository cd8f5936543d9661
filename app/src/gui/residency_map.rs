//! The residency map: one row per MoE layer, one cell per expert, coloured by where the expert
//! is and outlined by what happened to it in the latest steps.

use egui::{Color32, Rect, Sense, Stroke, StrokeKind, vec2};
use ferry_runtime::experts::{Access, ExpertCell, Residency, SlotState};

const HOST: Color32 = Color32::from_rgb(60, 60, 66);
const RESIDENT: Color32 = Color32::from_rgb(60, 120, 210);
const PINNED: Color32 = Color32::from_rgb(150, 90, 210);
const UPLOADING: Color32 = Color32::from_rgb(230, 160, 40);

fn fill(state: SlotState) -> Color32 {
    match state {
        SlotState::Host => HOST,
        SlotState::Resident => RESIDENT,
        SlotState::Pinned => PINNED,
        SlotState::Uploading => UPLOADING,
    }
}

fn outline(access: Access) -> Color32 {
    match access {
        Access::Hit => Color32::from_rgb(70, 220, 110),
        Access::PrefetchHit => Color32::from_rgb(60, 220, 220),
        Access::Miss => Color32::from_rgb(240, 60, 60),
        Access::Host => Color32::from_rgb(240, 160, 40),
        Access::Evicted => Color32::from_rgb(120, 40, 40),
    }
}

/// Keeps the latest picture and merges the events of pictures that arrive between two frames,
/// so a miss is not lost when the engine runs faster than the screen.
#[derive(Default)]
pub struct ResidencyView {
    pub latest: Option<Residency>,
    /// Steps after which some expert's state differed from the step before.
    pub changes: u64,
    /// Pictures received since the last frame was drawn.
    unseen: usize,
}

impl ResidencyView {
    pub fn update(&mut self, next: Residency) {
        let mut next = next;
        if let Some(prev) = &self.latest {
            let states = |r: &Residency| r.layers.iter().flatten().map(|c| c.state).collect::<Vec<_>>();
            if states(prev) != states(&next) {
                self.changes += 1;
            }
            if self.unseen > 0 {
                merge_access(prev, &mut next);
            }
        } else if next.layers.iter().flatten().any(|c| c.state != SlotState::Host) {
            self.changes += 1;
        }
        self.latest = Some(next);
        self.unseen += 1;
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn view(&mut self, ui: &mut egui::Ui) {
        self.unseen = 0;
        let Some(residency) = &self.latest else {
            ui.label("No expert traffic yet: send a message.");
            return;
        };
        legend(ui);
        let rows: Vec<(usize, &Vec<ExpertCell>)> =
            residency.layers.iter().enumerate().filter(|(_, cells)| !cells.is_empty()).collect();
        let Some(columns) = rows.iter().map(|(_, c)| c.len()).max() else {
            ui.label("This model has no routed experts (dense or lookup experts).");
            return;
        };
        let resident = residency.layers.iter().flatten().filter(|c| c.state != SlotState::Host).count();
        ui.label(format!(
            "{resident} of {} experts resident in {} slots of {:.2} MiB",
            rows.iter().map(|(_, c)| c.len()).sum::<usize>(),
            residency.slots,
            residency.expert_bytes as f64 / (1 << 20) as f64
        ));
        let label_width = 26.0;
        let cell = ((ui.available_width() - label_width) / columns as f32).clamp(4.0, 22.0);
        let size = vec2(label_width + cell * columns as f32, cell * rows.len() as f32);
        let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
        let painter = ui.painter_at(rect);
        let text_color = ui.visuals().text_color();
        for (row, (layer, cells)) in rows.iter().enumerate() {
            let y = rect.top() + row as f32 * cell;
            if cell >= 9.0 || row % 4 == 0 {
                painter.text(
                    egui::pos2(rect.left() + label_width - 4.0, y + cell / 2.0),
                    egui::Align2::RIGHT_CENTER,
                    layer.to_string(),
                    egui::FontId::monospace(cell.clamp(7.0, 11.0)),
                    text_color,
                );
            }
            for (expert, c) in cells.iter().enumerate() {
                let min = egui::pos2(rect.left() + label_width + expert as f32 * cell, y);
                let r = Rect::from_min_size(min, vec2(cell - 1.0, cell - 1.0));
                painter.rect_filled(r, 1.0, fill(c.state));
                if let Some(access) = c.access {
                    painter.rect_stroke(
                        r,
                        1.0,
                        Stroke::new((cell / 6.0).max(1.0), outline(access)),
                        StrokeKind::Inside,
                    );
                }
            }
        }
        if let Some(pos) = response.hover_pos() {
            let column = ((pos.x - rect.left() - label_width) / cell).floor();
            let row = ((pos.y - rect.top()) / cell).floor();
            if column >= 0.0 && row >= 0.0 {
                let (column, row) = (column as usize, row as usize);
                if let Some((layer, c)) = rows.get(row).and_then(|(l, cells)| cells.get(column).map(|c| (*l, c))) {
                    let clock = residency.clock;
                    let bytes = residency.expert_bytes;
                    response.on_hover_ui_at_pointer(|ui| tooltip(ui, layer, column, c, bytes, clock));
                }
            }
        }
    }
}

/// Keeps, for each expert, the more telling of the previous unseen event and the new one.
fn merge_access(prev: &Residency, next: &mut Residency) {
    for (old_layer, new_layer) in prev.layers.iter().zip(next.layers.iter_mut()) {
        for (old, new) in old_layer.iter().zip(new_layer.iter_mut()) {
            new.access = match (old.access, new.access) {
                (Some(Access::Miss), _) | (Some(_), None) => old.access,
                _ => new.access,
            };
        }
    }
}

fn tooltip(ui: &mut egui::Ui, layer: usize, expert: usize, c: &ExpertCell, bytes: u64, clock: u64) {
    ui.label(egui::RichText::new(format!("layer {layer}, expert {expert}")).strong());
    ui.label(format!("state: {:?}", c.state));
    ui.label(format!("size: {:.2} MiB", bytes as f64 / (1 << 20) as f64));
    ui.label(format!("uses: {} (hits {}, misses {})", c.uses, c.hits, c.misses));
    if c.last_use > 0 {
        ui.label(format!("last use: {} expert uses ago", clock.saturating_sub(c.last_use)));
    } else {
        ui.label("never used");
    }
    if let Some(access) = c.access {
        ui.label(format!("latest step: {access:?}"));
    }
}

fn legend(ui: &mut egui::Ui) {
    ui.horizontal_wrapped(|ui| {
        for (color, name) in [(HOST, "host"), (RESIDENT, "resident"), (PINNED, "pinned"), (UPLOADING, "uploading")] {
            swatch(ui, color, false);
            ui.label(name);
        }
        ui.separator();
        for (access, name) in [
            (Access::Hit, "hit"),
            (Access::PrefetchHit, "prefetch hit"),
            (Access::Miss, "miss"),
            (Access::Host, "computed on host"),
            (Access::Evicted, "evicted"),
        ] {
            swatch(ui, outline(access), true);
            ui.label(name);
        }
    });
}

fn swatch(ui: &mut egui::Ui, color: Color32, outlined: bool) {
    let (rect, _) = ui.allocate_exact_size(vec2(12.0, 12.0), Sense::hover());
    if outlined {
        ui.painter().rect_stroke(rect, 1.0, Stroke::new(2.0, color), StrokeKind::Inside);
    } else {
        ui.painter().rect_filled(rect, 1.0, color);
    }
}
