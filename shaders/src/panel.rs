//! The panelled layout of the decode kernels' weights: a `[steps, cols]` matrix (reduction by
//! outputs) kept as panels of `PANEL` output columns, each panel's rows one after the other (the
//! last panel narrower where `cols` does not divide).
//!
//! Why: a CPU adapter (lavapipe) runs eight lanes of units at a time, each lane four adjacent
//! outputs, so a batch reads 128 bytes of each weight row. In plain rows the next row's 128 bytes
//! lie a whole row (4-24 KiB on OLMoE's shapes) further on; in panels they follow on. Measured
//! on lavapipe, the same product read 2.1-3.0 GB/s over plain rows and 4.6-8.8 GB/s over panels
//! (BENCHMARKS.md). A GPU's warp still reads whole 128-byte runs, so every adapter gets the one
//! layout. Plain rows are the same layout with one panel as wide as the matrix, which is how the
//! kernels take both.

use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::bridge::{ShaderError, cube_float, from_cube};

/// Output columns per panel: 32 values, 128 bytes of f32 (eight lanes of four).
pub const PANEL: usize = 32;

/// How a matrix's values lie: plain `[steps, cols]` rows, or panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Rows,
    Panels,
}

impl Layout {
    /// The panel width, in vectors of `lanes` values, of a matrix `cols` values wide: the whole
    /// width for plain rows.
    pub fn width(self, cols: usize, lanes: usize) -> u32 {
        match self {
            Layout::Rows => (cols / lanes) as u32,
            Layout::Panels => (PANEL / lanes) as u32,
        }
    }
}

/// Where weight `(input j, output r)` of a `[steps, cols]` matrix lies in its panels. A unit's
/// adjacent outputs (vectors of a width dividing `PANEL` and `cols`) stay adjacent, so the
/// kernels load them as one vector.
pub fn panel_index(j: usize, r: usize, steps: usize, cols: usize) -> usize {
    let first = r / PANEL * PANEL;
    first * steps + j * PANEL.min(cols - first) + r % PANEL
}

/// `panel_index` in the kernels.
#[cube]
pub fn panel_at(j: usize, r: usize, steps: usize, cols: usize) -> usize {
    let first = r / PANEL * PANEL;
    first * steps + j * min(PANEL, cols - first) + r % PANEL
}

/// The first vector of unit `i`'s outputs in its panel and the distance, in vectors, from one
/// input's to the next's: panels of `width` vectors of a matrix `row` vectors wide (`width` =
/// `row` for plain rows).
#[cube]
pub fn panel_walk(i: usize, row: usize, steps: usize, width: usize) -> (usize, usize) {
    let first = i / width * width;
    (first * steps + i % width, min(width, row - first))
}

/// The kernels, apart so that their `Tensor` is CubeCL's.
mod kernel {
    use cubecl::prelude::*;

    use super::panel_at;

    /// `out` in panels from `plain` rows (`to_panels`), or back.
    #[cube(launch)]
    pub(super) fn reorder_kernel<F: Float>(
        input: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] to_panels: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= input.len() {
            terminate!();
        }
        let (steps, cols) = (input.shape(0), input.shape(1));
        let at = panel_at(pos / cols, pos % cols, steps, cols);
        if to_panels {
            out[at] = input[pos];
        } else {
            out[pos] = input[at];
        }
    }
}

/// `t` (`[steps, cols]`) reordered into panels, or out of them, in a new tensor.
fn reorder(t: &CubeTensor, to_panels: bool) -> Tensor<2> {
    let c = burn_cubecl::kernel::into_contiguous(t.clone());
    let client = c.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype(
        client.clone(),
        c.device.clone(),
        c.meta.shape().clone(),
        c.dtype,
    );
    let n = c.meta.shape().num_elements();
    let (count, dim) = crate::launches::elementwise(&client, n);
    kernel::reorder_kernel::launch(
        &client,
        count,
        dim,
        c.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        to_panels,
        burn::backend::cubecl::dtype_to_storage_type(c.dtype),
    );
    from_cube(out)
}

/// A `[steps, cols]` matrix (any float type; the values' bits are copied) in panels, with the
/// same shape: only the panelled kernels read it right.
pub fn to_panels(plain: Tensor<2>) -> Result<Tensor<2>, ShaderError> {
    Ok(reorder(&cube_float(plain)?, true))
}

/// The plain rows of a panelled matrix (for burn's matmul in a prefill).
pub fn from_panels(panelled: &CubeTensor) -> Tensor<2> {
    reorder(panelled, false)
}

/// Matrices with the same inputs side by side, each in its `Layout`: the joined matrix and its
/// layout. Full panels lie one after the other in memory, so matrices all in panels of whole
/// panels join end to end and stay in panels; otherwise the plain rows join.
pub fn cat(parts: Vec<(Tensor<2>, Layout)>) -> Result<(Tensor<2>, Layout), ShaderError> {
    let inputs = parts.first().map_or(0, |(t, _)| t.dims()[0]);
    let outputs: usize = parts.iter().map(|(t, _)| t.dims()[1]).sum();
    if parts.iter().all(|(t, layout)| *layout == Layout::Panels && t.dims()[1].is_multiple_of(PANEL)) {
        let flat = parts.into_iter().map(|(t, _)| t.reshape([-1])).collect();
        return Ok((Tensor::<1>::cat(flat, 0).reshape([inputs, outputs]), Layout::Panels));
    }
    let rows = parts
        .into_iter()
        .map(|(t, layout)| match layout {
            Layout::Rows => Ok(t),
            Layout::Panels => Ok(from_panels(&cube_float(t)?)),
        })
        .collect::<Result<Vec<_>, ShaderError>>()?;
    Ok((Tensor::cat(rows, 1), Layout::Rows))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::{Layout, PANEL, cat, from_panels, panel_index, to_panels};
    use crate::bridge::cube_float;
    use crate::testing::device;

    /// Every weight of a `[steps, cols]` matrix gets its own place (full panels and a narrower
    /// last one), a unit's adjacent outputs adjacent.
    #[test]
    fn panels_place_every_weight_once() {
        for (steps, cols) in [(3, 32), (5, 40), (2, 70), (4, 7), (1, 96)] {
            let mut seen = vec![false; steps * cols];
            for j in 0..steps {
                for r in 0..cols {
                    let at = panel_index(j, r, steps, cols);
                    assert!(!seen[at], "{steps} x {cols}: ({j}, {r}) lands on a taken place");
                    seen[at] = true;
                    if r + 1 < cols && (r + 1) % PANEL != 0 {
                        assert_eq!(panel_index(j, r + 1, steps, cols), at + 1);
                    }
                }
            }
        }
    }

    /// The device reorder puts each value where `panel_index` says, and back.
    #[test]
    fn to_panels_and_back_on_the_device() {
        for (steps, cols) in [(3, 64), (5, 40), (2, 7)] {
            let values: Vec<f32> = (0..steps * cols).map(|v| v as f32).collect();
            let plain = Tensor::<2>::from_data(TensorData::new(values.clone(), [steps, cols]), &device());
            let panelled = to_panels(plain).unwrap();
            assert_eq!(panelled.dims(), [steps, cols]);
            let got: Vec<f32> = panelled.clone().into_data().try_to_vec().unwrap();
            for j in 0..steps {
                for r in 0..cols {
                    assert_eq!(got[panel_index(j, r, steps, cols)], values[j * cols + r], "{steps} x {cols}");
                }
            }
            let back: Vec<f32> = from_panels(&cube_float(panelled).unwrap()).into_data().try_to_vec().unwrap();
            assert_eq!(back, values);
        }
    }

    /// Joining panelled and plain matrices gives the plain join's values, in panels where every
    /// part was in whole panels.
    #[test]
    fn joined_matrices_keep_their_values_in_either_layout() {
        let device = &device();
        let matrix = |cols: usize, seed: usize| {
            let values: Vec<f32> = (0..3 * cols).map(|v| (v * 7 + seed) as f32).collect();
            Tensor::<2>::from_data(TensorData::new(values, [3, cols]), device)
        };
        let plain = |t: &Tensor<2>, layout| match layout {
            Layout::Rows => t.clone(),
            Layout::Panels => from_panels(&cube_float(t.clone()).unwrap()),
        };
        for (widths, layouts, joined) in [
            (vec![64, 32], vec![Layout::Panels, Layout::Panels], Layout::Panels),
            (vec![64, 16], vec![Layout::Panels, Layout::Rows], Layout::Rows),
            (vec![16, 32, 64], vec![Layout::Rows, Layout::Panels, Layout::Panels], Layout::Rows),
        ] {
            let parts: Vec<Tensor<2>> = widths.iter().enumerate().map(|(i, &w)| matrix(w, i)).collect();
            let want: Vec<f32> = Tensor::cat(parts.clone(), 1).into_data().try_to_vec().unwrap();
            let stored = parts
                .into_iter()
                .zip(&layouts)
                .map(|(t, &layout)| (if layout == Layout::Panels { to_panels(t).unwrap() } else { t }, layout))
                .collect();
            let (got, layout) = cat(stored).unwrap();
            assert_eq!(layout, joined, "{widths:?}");
            let got: Vec<f32> = plain(&got, layout).into_data().try_to_vec().unwrap();
            assert_eq!(got, want, "{widths:?} {layouts:?}");
        }
    }
}
