//! The AVX2 + FMA + F16C path: how a product is cut into parallel tasks, register tiles and
//! cache-sized chunks; the instructions themselves are in [`super::x86`].

use std::ops::Range;

use rayon::prelude::*;

use super::matrix::{element, WeightDType, WeightMatrix};
use super::x86;
use super::{OutPtr, ROWS_PER_TASK};

/// Inputs consumed per step of the AVX2 tile kernels (two 8-lane vectors).
const AVX2_STEP: usize = 16;
/// Weight rows per AVX2 pass when decoding one row: each input vector load feeds eight rows
/// (eight accumulators), and the sums go straight to the output.
pub(super) const AVX2_DECODE_WEIGHT_ROWS: usize = 8;
/// Weight rows × input rows per AVX2 tile for several input rows (12 accumulators in registers).
const AVX2_TILE: (usize, usize) = (3, 4);
/// Columns per pass over the inputs when several rows are computed, so that the inputs' slice
/// (`rows × AVX2_CHUNK` f32) stays in L2 while every weight row of a task meets it.
const AVX2_CHUNK: usize = 512;

/// One parallel task's part of a linear layer's output: `rows` of the `n` output rows (columns
/// of `out`, which holds `m` input rows of `n`).
struct TaskOutput {
    out: OutPtr,
    n: usize,
    m: usize,
    rows: Range<usize>,
}

impl TaskOutput {
    /// This task's outputs for a single input row (`m == 1`), in row order.
    fn single_input_outputs(&mut self) -> &mut [f32] {
        assert_eq!(self.m, 1, "only one input row has its outputs side by side");
        // SAFETY: with one input row, output `row` is element `row`; `rows` lies inside `out`
        // and only this task writes it; `&mut self` keeps the slice unique within the task.
        unsafe { std::slice::from_raw_parts_mut(self.out.get().add(self.rows.start), self.rows.len()) }
    }

    /// Adds `value` to output `(input_row, output_row)`, which must be one of this task's.
    #[inline]
    fn add(&self, input_row: usize, output_row: usize, value: f32) {
        assert!(input_row < self.m && self.rows.contains(&output_row), "a task writes only its own rows");
        // SAFETY: the element is inside `out` (checked above) and only this task writes `rows`.
        unsafe { *self.out.get().add(input_row * self.n + output_row) += value };
    }
}

/// Runs `body` in parallel on tasks of `ROWS_PER_TASK` output rows, each task's part of `out`
/// (`m` rows of `n`) first set to the bias; `body` adds its dot products to it.
fn for_each_row_task(
    n: usize,
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    body: impl Fn(&mut TaskOutput) + Sync,
) {
    assert_eq!(out.len(), m * n, "the output holds m rows of n");
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
        for row in rows.clone() {
            for i in 0..m {
                // SAFETY: (i, row) is inside `out` and only this task writes `rows`.
                unsafe { *out_ptr.get().add(i * n + row) = bias.map_or(0.0, |b| b[row]) };
            }
        }
        body(&mut TaskOutput { out: out_ptr, n, m, rows });
    });
}

/// The AVX2 path: tiles of weight rows × input rows held in registers, columns in chunks that
/// keep the inputs cache-resident; for bf16 the inputs are first laid out to match how the
/// kernel widens weights (see [`bf16_pair_layout`]).
pub(super) fn linear_avx2(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let m = x.len() / k;
    if m >= PANEL_INPUT_ROWS {
        return matmul_avx2_packed(x, w, bias, out);
    }
    let steps = k - k % AVX2_STEP;
    let prepared;
    let inputs = if w.dtype() == WeightDType::BF16 {
        prepared = bf16_pair_layout(x, k);
        &prepared[..]
    } else {
        x
    };
    let (data, row_bytes, dtype) = (w.data(), k * w.dtype().size(), w.dtype());
    for_each_row_task(n, m, bias, out, |task| {
        let rows = task.rows.clone();
        if m == 1 {
            // SAFETY: AVX2/FMA/F16C availability was checked by `linear_with`; the weights
            // hold the task's rows of `row_bytes` each, the input `steps <= k` columns.
            unsafe {
                x86::rows_avx2(
                    dtype,
                    data.as_ptr().add(rows.start * row_bytes),
                    row_bytes,
                    inputs.as_ptr(),
                    steps,
                    task.single_input_outputs(),
                )
            };
        } else {
            add_tiles_avx2(task, w, inputs, m, steps);
        }
        for row in rows.filter(|_| steps < k) {
            let weights = &data[row * row_bytes..(row + 1) * row_bytes];
            for i in 0..m {
                let tail: f32 = (steps..k).map(|e| element(weights, e, dtype) * inputs[i * k + e]).sum();
                task.add(i, row, tail);
            }
        }
    });
}

/// Adds to `task`'s outputs the dot products of its weight rows with the `m` input rows over
/// the first `steps` columns: tiles of weight rows × input rows in registers, the columns in
/// chunks that keep the inputs cache-resident.
fn add_tiles_avx2(task: &TaskOutput, w: &WeightMatrix, inputs: &[f32], m: usize, steps: usize) {
    let (data, k, dtype) = (w.data(), w.cols(), w.dtype());
    let row_bytes = k * dtype.size();
    let (weight_rows, input_rows) = AVX2_TILE;
    let rows = task.rows.clone();
    for start in (0..steps).step_by(AVX2_CHUNK) {
        let len = AVX2_CHUNK.min(steps - start);
        for first in rows.clone().step_by(weight_rows) {
            let count_w = weight_rows.min(rows.end - first);
            for block in (0..m).step_by(input_rows) {
                let count = input_rows.min(m - block);
                // SAFETY: AVX2/FMA/F16C availability was checked by `linear_with`; the
                // pointers address `count_w` weight rows and `count` input rows holding
                // columns `start..start + len` (len a multiple of AVX2_STEP, within k).
                let tile = unsafe {
                    x86::tile_avx2(
                        dtype,
                        data.as_ptr().add(first * row_bytes + start * dtype.size()),
                        row_bytes,
                        inputs.as_ptr().add(block * k + start),
                        k,
                        len,
                        (count_w, count),
                    )
                };
                for (j, dots) in tile.iter().enumerate().take(count_w) {
                    for (i, dot) in dots.iter().enumerate().take(count) {
                        task.add(block + i, first + j, *dot);
                    }
                }
            }
        }
    }
}

/// Weight rows per packed panel of the AVX2 matrix product (two 8-lane vectors).
pub(super) const PANEL_WIDTH: usize = 16;
/// Input rows per register block of the AVX2 matrix product (12 accumulators); also the
/// fewest input rows for which packing the weights pays off.
pub(super) const PANEL_INPUT_ROWS: usize = 6;
/// Columns per packed panel: 16 × 256 f32 (16 KiB) stay in L1 while every input block meets
/// them, and the inputs' 256-column slice stays in L2.
const PANEL_DEPTH: usize = 256;

/// The AVX2 product for many input rows (prefill): panels of 16 weight rows × 256 columns are
/// widened to f32 and transposed once, then every block of 6 input rows is multiplied with
/// the panel by broadcasting one input at a time against 16 weights (outer products).
fn matmul_avx2_packed(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let m = x.len() / k;
    let (data, row_bytes, dtype) = (w.data(), k * w.dtype().size(), w.dtype());
    for_each_row_task(n, m, bias, out, |task| {
        let rows = task.rows.clone();
        let mut panel = vec![0.0f32; PANEL_DEPTH * PANEL_WIDTH];
        for start in (0..k).step_by(PANEL_DEPTH) {
            let depth = PANEL_DEPTH.min(k - start);
            for first in rows.clone().step_by(PANEL_WIDTH) {
                let width = PANEL_WIDTH.min(rows.end - first);
                let weights = &data[first * row_bytes..(first + width) * row_bytes];
                // SAFETY: AVX2/FMA/F16C availability was checked by `linear_with`; `weights`
                // holds `width` rows of k and `start + depth <= k`; `panel` holds depth × 16.
                unsafe {
                    x86::pack_panel(dtype, weights, row_bytes, width, start..start + depth, &mut panel)
                };
                for block in (0..m).step_by(PANEL_INPUT_ROWS) {
                    let count = PANEL_INPUT_ROWS.min(m - block);
                    // SAFETY: as above; the input pointer addresses `count` rows of k from
                    // column `start`, of which `depth` columns are read.
                    let product = unsafe {
                        x86::panel_product(&panel, x.as_ptr().add(block * k + start), k, depth, count)
                    };
                    for (i, sums) in product.iter().enumerate().take(count) {
                        for (j, sum) in sums.iter().enumerate().take(width) {
                            task.add(block + i, first + j, *sum);
                        }
                    }
                }
            }
        }
    });
}

/// Rows of `k` inputs with each whole 16-column block reordered as its 8 even columns, then
/// its 8 odd ones: the AVX2 kernel widens 16 bf16 weights into exactly those two vectors with
/// one shift and one mask (no shuffles). Leftover columns keep their places.
fn bf16_pair_layout(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for (row_out, row) in out.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        for (block_out, block) in row_out.chunks_exact_mut(AVX2_STEP).zip(row.chunks_exact(AVX2_STEP)) {
            for i in 0..AVX2_STEP / 2 {
                block_out[i] = block[2 * i];
                block_out[AVX2_STEP / 2 + i] = block[2 * i + 1];
            }
        }
    }
    out
}
