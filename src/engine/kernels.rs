//! Matrix kernels for the CPU hot path: `y = x Wᵀ` with the weight read in its stored dtype
//! (f32, bf16 or f16) straight from memory (usually the memory-mapped checkpoint), SIMD
//! chosen at run time (AVX-512, AVX2 + FMA + F16C, or portable), threads over output rows.
//!
//! Decoding is bound by memory bandwidth: each weight row is read once per call and, while
//! it sits in L1, dotted with every input row.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Element type of a stored weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    BF16,
    F16,
}

impl WeightDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::BF16 | WeightDType::F16 => 2,
        }
    }
}

/// A `[rows, cols]` row-major matrix over shared bytes (a memory map or an owned buffer).
#[derive(Clone)]
pub struct WeightMatrix {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
    rows: usize,
    cols: usize,
    dtype: WeightDType,
}

impl std::fmt::Debug for WeightMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightMatrix({}x{} {:?})", self.rows, self.cols, self.dtype)
    }
}

impl WeightMatrix {
    /// The matrix stored at `range` of `bytes`, checking that the sizes agree.
    pub fn new(
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
        rows: usize,
        cols: usize,
        dtype: WeightDType,
    ) -> Result<Self> {
        let expected = rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size()));
        let fits = range.end <= (*bytes).as_ref().len();
        if expected != Some(range.len()) || !fits {
            return Err(Error::InvalidModel(format!(
                "{} bytes cannot hold a {rows}x{cols} {dtype:?} matrix",
                range.len()
            )));
        }
        Ok(Self { bytes, range, rows, cols, dtype })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Stored element type.
    pub fn dtype(&self) -> WeightDType {
        self.dtype
    }

    fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }

    /// Row `row` widened to f32 (embedding lookups).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) {
        let width = self.cols * self.dtype.size();
        let bytes = &self.data()[row * width..(row + 1) * width];
        for (i, value) in out.iter_mut().enumerate().take(self.cols) {
            *value = element(bytes, i, self.dtype);
        }
    }
}

/// Element `i` of little-endian `bytes` as f32.
fn element(bytes: &[u8], i: usize, dtype: WeightDType) -> f32 {
    match dtype {
        WeightDType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        WeightDType::BF16 => {
            half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
        WeightDType::F16 => {
            half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
    }
}

/// Instruction sets the kernels can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 plus BF16 dot products: bf16 weights meet activations rounded to bf16
    /// (as bf16 inference in transformers does) when several rows are computed at once.
    Avx512Bf16,
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
                    return Isa::Avx512Bf16;
                }
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn available(self) -> bool {
        match (self, Isa::detect()) {
            (Isa::Portable, _) => true,
            (Isa::Avx2, best) => best != Isa::Portable,
            (Isa::Avx512, best) => matches!(best, Isa::Avx512 | Isa::Avx512Bf16),
            (Isa::Avx512Bf16, best) => best == Isa::Avx512Bf16,
        }
    }
}

/// Input rows computed together against one weight row.
const ROW_BLOCK: usize = 4;
/// Weight rows computed together (each loaded vector reused across the input rows).
const WEIGHT_BLOCK: usize = 4;
/// Output rows per parallel task (a few hundred KB of weights).
const ROWS_PER_TASK: usize = 64;

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` with the best instruction set.
pub fn linear(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    linear_with(Isa::detect(), x, w, bias, out)
}

/// [`linear`] with a chosen instruction set (tests force each one).
pub fn linear_with(
    isa: Isa,
    x: &[f32],
    w: &WeightMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if k == 0
        || !x.len().is_multiple_of(k)
        || out.len() != x.len() / k * n
        || bias.is_some_and(|b| b.len() != n)
    {
        return Err(Error::InvalidArgument(format!(
            "linear: input of {} values, weight {n}x{k}, output of {} values do not fit",
            x.len(),
            out.len()
        )));
    }
    if !isa.available() {
        return Err(Error::InvalidArgument(format!("this CPU cannot run {isa:?} kernels")));
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        linear_avx2(x, w, bias, out);
        return Ok(());
    }
    let m = x.len() / k;
    let data = w.data();
    let row_bytes = k * w.dtype.size();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let x_bf16: Vec<u16> = if isa == Isa::Avx512Bf16 && w.dtype == WeightDType::BF16 && m > 1 {
        x.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()
    } else {
        Vec::new()
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
        let mut tile = [[0f32; ROW_BLOCK]; WEIGHT_BLOCK];
        for first in rows.clone().step_by(WEIGHT_BLOCK) {
            let count_w = WEIGHT_BLOCK.min(rows.end - first);
            let weights = &data[first * row_bytes..(first + count_w) * row_bytes];
            for block in (0..m).step_by(ROW_BLOCK) {
                let count = ROW_BLOCK.min(m - block);
                let inputs = &x[block * k..(block + count) * k];
                let inputs_bf16 = x_bf16.get(block * k..(block + count) * k).unwrap_or_default();
                dot_tile(isa, w.dtype, weights, count_w, (inputs, inputs_bf16), k, count, &mut tile);
                for (j, dots) in tile.iter().enumerate().take(count_w) {
                    let add = bias.map_or(0.0, |b| b[first + j]);
                    for (i, dot) in dots.iter().enumerate().take(count) {
                        // SAFETY: (block + i, first + j) is inside `out`; no other task writes these rows.
                        unsafe { *out_ptr.get().add((block + i) * n + first + j) = dot + add };
                    }
                }
            }
        }
    });
    Ok(())
}

/// Inputs consumed per step of the AVX2 tile kernels (two 8-lane vectors).
const AVX2_STEP: usize = 16;
/// Weight rows per AVX2 pass when decoding one row: each input vector load feeds eight rows
/// (eight accumulators), and the sums go straight to the output.
const AVX2_DECODE_WEIGHT_ROWS: usize = 8;
/// Weight rows × input rows per AVX2 tile for several input rows (12 accumulators in registers).
const AVX2_TILE: (usize, usize) = (3, 4);
/// Columns per pass over the inputs when several rows are computed, so that the inputs' slice
/// (`rows × AVX2_CHUNK` f32) stays in L2 while every weight row of a task meets it.
const AVX2_CHUNK: usize = 512;

/// One parallel task's part of a linear layer's output: `rows` of the `n` output rows (columns
/// of `out`, which holds `m` input rows of `n`).
#[cfg(target_arch = "x86_64")]
struct TaskOutput {
    out: OutPtr,
    n: usize,
    m: usize,
    rows: std::ops::Range<usize>,
}

#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
fn linear_avx2(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let m = x.len() / k;
    if m >= PANEL_INPUT_ROWS {
        return matmul_avx2_packed(x, w, bias, out);
    }
    let steps = k - k % AVX2_STEP;
    let prepared;
    let inputs = if w.dtype == WeightDType::BF16 {
        prepared = bf16_pair_layout(x, k);
        &prepared[..]
    } else {
        x
    };
    let (data, row_bytes, dtype) = (w.data(), k * w.dtype.size(), w.dtype);
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
#[cfg(target_arch = "x86_64")]
fn add_tiles_avx2(task: &TaskOutput, w: &WeightMatrix, inputs: &[f32], m: usize, steps: usize) {
    let (data, k, dtype) = (w.data(), w.cols, w.dtype);
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
const PANEL_WIDTH: usize = 16;
/// Input rows per register block of the AVX2 matrix product (12 accumulators); also the
/// fewest input rows for which packing the weights pays off.
const PANEL_INPUT_ROWS: usize = 6;
/// Columns per packed panel: 16 × 256 f32 (16 KiB) stay in L1 while every input block meets
/// them, and the inputs' 256-column slice stays in L2.
const PANEL_DEPTH: usize = 256;

/// The AVX2 product for many input rows (prefill): panels of 16 weight rows × 256 columns are
/// widened to f32 and transposed once, then every block of 6 input rows is multiplied with
/// the panel by broadcasting one input at a time against 16 weights (outer products).
#[cfg(target_arch = "x86_64")]
fn matmul_avx2_packed(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let m = x.len() / k;
    let (data, row_bytes, dtype) = (w.data(), k * w.dtype.size(), w.dtype);
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

/// `tile[j][i]` = dot of weight row `j` (of `weight_rows`) with input row `i` (of `rows`);
/// inputs come as f32 and, for the BF16 dot-product path, also rounded to bf16 (else empty).
#[allow(clippy::too_many_arguments)]
fn dot_tile(
    isa: Isa,
    dtype: WeightDType,
    weights: &[u8],
    weight_rows: usize,
    (inputs, inputs_bf16): (&[f32], &[u16]),
    k: usize,
    rows: usize,
    tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
) {
    #[cfg(target_arch = "x86_64")]
    if !inputs_bf16.is_empty() && weight_rows == WEIGHT_BLOCK {
        // SAFETY: the BF16 path is only prepared when `isa` is Avx512Bf16 (checked available);
        // `weights` holds WEIGHT_BLOCK bf16 rows of k and `inputs_bf16` `rows` rows of k.
        return unsafe { x86::dot_tile_avx512_bf16(weights, inputs, inputs_bf16, k, rows, tile) };
    }
    #[cfg(target_arch = "x86_64")]
    // Decoding (one input row) streams one weight row at a time: fewer concurrent streams
    // keep the prefetchers at full bandwidth.
    if matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) && weight_rows == WEIGHT_BLOCK && rows > 1 {
        // SAFETY: AVX-512 availability was checked by the caller; `weights` holds WEIGHT_BLOCK
        // rows of k elements and `inputs` holds `rows` rows of k.
        return unsafe { x86::dot_tile_avx512(dtype, weights, inputs, k, rows, tile) };
    }
    let row_bytes = k * dtype.size();
    for (j, dots) in tile.iter_mut().enumerate().take(weight_rows) {
        dot_rows(isa, dtype, &weights[j * row_bytes..(j + 1) * row_bytes], inputs, k, &mut dots[..rows]);
    }
}

/// Dot products of one weight row with `dots.len()` input rows of length `k`.
fn dot_rows(isa: Isa, dtype: WeightDType, weights: &[u8], inputs: &[f32], k: usize, dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa.available()` was checked by the caller; slices have the lengths the
        // kernels index (weights: k elements, inputs: dots.len() rows of k).
        match isa {
            Isa::Avx512 | Isa::Avx512Bf16 => {
                return unsafe { x86::dot_rows_avx512(dtype, weights, inputs, k, dots) }
            }
            Isa::Avx2 | Isa::Portable => {}
        }
    }
    let _ = isa;
    dot_rows_portable(dtype, weights, inputs, k, dots);
}

fn dot_rows_portable(dtype: WeightDType, weights: &[u8], inputs: &[f32], k: usize, dots: &mut [f32]) {
    dots.fill(0.0);
    for i in 0..k {
        let w = element(weights, i, dtype);
        for (r, dot) in dots.iter_mut().enumerate() {
            *dot += w * inputs[r * k + i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{element, WeightDType, PANEL_INPUT_ROWS, PANEL_WIDTH, ROW_BLOCK, WEIGHT_BLOCK};

    /// Loads 16 weights from `weights` at element `i` as f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(dtype: WeightDType, weights: *const u8, i: usize) -> __m512 {
        match dtype {
            WeightDType::F32 => _mm512_loadu_ps(weights.add(4 * i) as *const f32),
            WeightDType::BF16 => {
                let raw = _mm256_loadu_si256(weights.add(2 * i) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            }
            WeightDType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(weights.add(2 * i) as *const __m256i)),
        }
    }

    /// AVX-512 dot products: 32 elements per step, two accumulators per input row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_rows_avx512(
        dtype: WeightDType,
        weights: &[u8],
        inputs: &[f32],
        k: usize,
        dots: &mut [f32],
    ) {
        let rows = dots.len();
        let (w, x) = (weights.as_ptr(), inputs.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; ROW_BLOCK];
        let mut i = 0;
        while i + 32 <= k {
            let w0 = load16(dtype, w, i);
            let w1 = load16(dtype, w, i + 16);
            for (r, pair) in acc.iter_mut().enumerate().take(rows) {
                let xr = x.add(r * k + i);
                pair[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), pair[0]);
                pair[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), pair[1]);
            }
            i += 32;
        }
        for (r, (pair, out)) in acc.iter().zip(dots.iter_mut()).enumerate() {
            let mut dot = _mm512_reduce_add_ps(_mm512_add_ps(pair[0], pair[1]));
            for j in i..k {
                dot += element(weights, j, dtype) * inputs[r * k + j];
            }
            *out = dot;
        }
    }

    /// A WEIGHT_BLOCK × `rows` tile of dot products: per 16 elements, WEIGHT_BLOCK weight loads
    /// and `rows` input loads feed WEIGHT_BLOCK × `rows` FMAs, all in registers.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_tile_avx512(
        dtype: WeightDType,
        weights: &[u8],
        inputs: &[f32],
        k: usize,
        rows: usize,
        tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
    ) {
        // A fixed row count lets the accumulators live in registers.
        match rows {
            2 => tile_avx512::<2>(dtype, weights, inputs, k, tile),
            3 => tile_avx512::<3>(dtype, weights, inputs, k, tile),
            _ => tile_avx512::<ROW_BLOCK>(dtype, weights, inputs, k, tile),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const ROWS: usize>(
        dtype: WeightDType,
        weights: &[u8],
        inputs: &[f32],
        k: usize,
        tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
    ) {
        let rows = ROWS;
        let row_bytes = k * dtype.size();
        let (w, x) = (weights.as_ptr(), inputs.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); ROWS]; WEIGHT_BLOCK];
        let mut i = 0;
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); WEIGHT_BLOCK];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = load16(dtype, w.add(j * row_bytes), i);
            }
            for r in 0..rows {
                let xv = _mm512_loadu_ps(x.add(r * k + i));
                for (lane, v) in acc.iter_mut().zip(&wv) {
                    lane[r] = _mm512_fmadd_ps(*v, xv, lane[r]);
                }
            }
            i += 16;
        }
        for (j, (lanes, dots)) in acc.iter().zip(tile.iter_mut()).enumerate() {
            let row = &weights[j * row_bytes..(j + 1) * row_bytes];
            for (r, (lane, dot)) in lanes.iter().zip(dots.iter_mut()).enumerate().take(rows) {
                let mut sum = _mm512_reduce_add_ps(*lane);
                for e in i..k {
                    sum += element(row, e, dtype) * inputs[r * k + e];
                }
                *dot = sum;
            }
        }
    }

    /// A WEIGHT_BLOCK × `rows` tile with BF16 dot products (32 multiply-adds per instruction).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_tile_avx512_bf16(
        weights: &[u8],
        inputs: &[f32],
        inputs_bf16: &[u16],
        k: usize,
        rows: usize,
        tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
    ) {
        match rows {
            1 => tile_bf16::<1>(weights, inputs, inputs_bf16, k, tile),
            2 => tile_bf16::<2>(weights, inputs, inputs_bf16, k, tile),
            3 => tile_bf16::<3>(weights, inputs, inputs_bf16, k, tile),
            _ => tile_bf16::<ROW_BLOCK>(weights, inputs, inputs_bf16, k, tile),
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_bf16<const ROWS: usize>(
        weights: &[u8],
        inputs: &[f32],
        inputs_bf16: &[u16],
        k: usize,
        tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
    ) {
        let row_bytes = 2 * k;
        let (w, x) = (weights.as_ptr(), inputs_bf16.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); ROWS]; WEIGHT_BLOCK];
        let mut i = 0;
        while i + 32 <= k {
            let mut wv: [__m512bh; WEIGHT_BLOCK] = std::mem::zeroed();
            for (j, v) in wv.iter_mut().enumerate() {
                *v = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    w.add(j * row_bytes + 2 * i) as *const _,
                ));
            }
            for r in 0..ROWS {
                let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    x.add(r * k + i) as *const _
                ));
                for (lane, v) in acc.iter_mut().zip(&wv) {
                    lane[r] = _mm512_dpbf16_ps(lane[r], *v, xv);
                }
            }
            i += 32;
        }
        for (j, (lanes, dots)) in acc.iter().zip(tile.iter_mut()).enumerate() {
            let row = &weights[j * row_bytes..(j + 1) * row_bytes];
            for (r, (lane, dot)) in lanes.iter().zip(dots.iter_mut()).enumerate() {
                let mut sum = _mm512_reduce_add_ps(*lane);
                for e in i..k {
                    sum += element(row, e, WeightDType::BF16) * inputs[r * k + e];
                }
                *dot = sum;
            }
        }
    }

    /// The 16 weights at element `i` as two f32 vectors (for bf16: even then odd columns,
    /// matching [`super::bf16_pair_layout`]; otherwise columns `i..i + 8` and `i + 8..i + 16`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load16_pair(dtype: WeightDType, weights: *const u8, i: usize) -> (__m256, __m256) {
        match dtype {
            WeightDType::F32 => {
                let p = weights.add(4 * i) as *const f32;
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            }
            WeightDType::BF16 => {
                let raw = _mm256_loadu_si256(weights.add(2 * i) as *const __m256i);
                let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)),
                    _mm256_castsi256_ps(_mm256_and_si256(raw, high)),
                )
            }
            WeightDType::F16 => {
                let p = weights.add(2 * i) as *const __m128i;
                (_mm256_cvtph_ps(_mm_loadu_si128(p)), _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))))
            }
        }
    }

    /// Dot products of `shape.0` (≤ 4) weight rows with `shape.1` (≤ 4) input rows over `len`
    /// columns (a multiple of 16); `tile[j][i]` pairs weight row `j` with input row `i`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2(
        dtype: WeightDType,
        weights: *const u8,
        row_bytes: usize,
        inputs: *const f32,
        input_stride: usize,
        len: usize,
        shape: (usize, usize),
    ) -> [[f32; ROW_BLOCK]; WEIGHT_BLOCK] {
        let args = (weights, row_bytes, inputs, input_stride, len);
        // A loop per dtype keeps the dtype's branch out of the loop.
        match dtype {
            WeightDType::F32 => tile_dtype_avx2::<0>(args, shape),
            WeightDType::BF16 => tile_dtype_avx2::<1>(args, shape),
            WeightDType::F16 => tile_dtype_avx2::<2>(args, shape),
        }
    }

    /// The weight dtypes by the code the tile kernels are specialised on.
    const TILE_DTYPES: [WeightDType; 3] = [WeightDType::F32, WeightDType::BF16, WeightDType::F16];

    type TileArgs = (*const u8, usize, *const f32, usize, usize);

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_dtype_avx2<const D: usize>(
        args: TileArgs,
        shape: (usize, usize),
    ) -> [[f32; ROW_BLOCK]; WEIGHT_BLOCK] {
        // Fixed tile sizes let the accumulators live in registers.
        match shape.0 {
            1 => tile_rows_avx2::<1, D>(args, shape.1),
            2 => tile_rows_avx2::<2, D>(args, shape.1),
            3 => tile_rows_avx2::<3, D>(args, shape.1),
            _ => tile_rows_avx2::<4, D>(args, shape.1),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_rows_avx2<const WR: usize, const D: usize>(
        args: TileArgs,
        input_rows: usize,
    ) -> [[f32; ROW_BLOCK]; WEIGHT_BLOCK] {
        match input_rows {
            1 => tile_fixed_avx2::<WR, 1, D>(args),
            2 => tile_fixed_avx2::<WR, 2, D>(args),
            3 => tile_fixed_avx2::<WR, 3, D>(args),
            _ => tile_fixed_avx2::<WR, 4, D>(args),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_fixed_avx2<const WR: usize, const XR: usize, const D: usize>(
        (w, row_bytes, x, stride, len): TileArgs,
    ) -> [[f32; ROW_BLOCK]; WEIGHT_BLOCK] {
        let dtype = TILE_DTYPES[D];
        let mut acc = [[_mm256_setzero_ps(); XR]; WR];
        let mut i = 0;
        while i < len {
            for (j, lanes) in acc.iter_mut().enumerate() {
                let (low, high) = load16_pair(dtype, w.add(j * row_bytes), i);
                for (r, lane) in lanes.iter_mut().enumerate() {
                    let xr = x.add(r * stride + i);
                    *lane = _mm256_fmadd_ps(low, _mm256_loadu_ps(xr), *lane);
                    *lane = _mm256_fmadd_ps(high, _mm256_loadu_ps(xr.add(8)), *lane);
                }
            }
            i += 16;
        }
        let mut tile = [[0.0; ROW_BLOCK]; WEIGHT_BLOCK];
        for (lanes, dots) in acc.iter().zip(tile.iter_mut()) {
            for (lane, dot) in lanes.iter().zip(dots.iter_mut()) {
                *dot = sum8(*lane);
            }
        }
        tile
    }

    /// Dot products of `out.len()` consecutive weight rows with one input row over `len`
    /// columns (a multiple of 16), added to `out`: [`super::AVX2_DECODE_WEIGHT_ROWS`] rows per
    /// pass over the input, each input vector load feeding all of them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2(
        dtype: WeightDType,
        weights: *const u8,
        row_bytes: usize,
        input: *const f32,
        len: usize,
        out: &mut [f32],
    ) {
        match dtype {
            WeightDType::F32 => rows_dtype_avx2::<0>(weights, row_bytes, input, len, out),
            WeightDType::BF16 => rows_dtype_avx2::<1>(weights, row_bytes, input, len, out),
            WeightDType::F16 => rows_dtype_avx2::<2>(weights, row_bytes, input, len, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_dtype_avx2<const D: usize>(
        weights: *const u8,
        row_bytes: usize,
        input: *const f32,
        len: usize,
        out: &mut [f32],
    ) {
        const ROWS: usize = super::AVX2_DECODE_WEIGHT_ROWS;
        let done = out.len() / ROWS * ROWS;
        let mut blocks = out.chunks_exact_mut(ROWS);
        for (b, block) in blocks.by_ref().enumerate() {
            rows_fixed_avx2::<ROWS, D>(weights.add(b * ROWS * row_bytes), row_bytes, input, len, block);
        }
        for (j, value) in blocks.into_remainder().iter_mut().enumerate() {
            let row = weights.add((done + j) * row_bytes);
            rows_fixed_avx2::<1, D>(row, row_bytes, input, len, std::slice::from_mut(value));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_fixed_avx2<const WR: usize, const D: usize>(
        w: *const u8,
        row_bytes: usize,
        x: *const f32,
        len: usize,
        out: &mut [f32],
    ) {
        let dtype = TILE_DTYPES[D];
        let mut acc = [_mm256_setzero_ps(); WR];
        let mut i = 0;
        while i < len {
            let (x_low, x_high) = (_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(x.add(i + 8)));
            for (j, lane) in acc.iter_mut().enumerate() {
                let (low, high) = load16_pair(dtype, w.add(j * row_bytes), i);
                *lane = _mm256_fmadd_ps(low, x_low, *lane);
                *lane = _mm256_fmadd_ps(high, x_high, *lane);
            }
            i += 16;
        }
        for (lane, value) in acc.iter().zip(out.iter_mut()) {
            *value += sum8(*lane);
        }
    }

    /// Loads 8 weights at element `i` as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(dtype: WeightDType, weights: *const u8, i: usize) -> __m256 {
        match dtype {
            WeightDType::F32 => _mm256_loadu_ps(weights.add(4 * i) as *const f32),
            WeightDType::BF16 => {
                let raw = _mm_loadu_si128(weights.add(2 * i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
            }
            WeightDType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(weights.add(2 * i) as *const __m128i)),
        }
    }

    /// Widens columns `columns` of `width` (≤ 16) weight rows into `panel` as
    /// `panel[c * 16 + r]`; rows past `width` are zero.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_panel(
        dtype: WeightDType,
        weights: &[u8],
        row_bytes: usize,
        width: usize,
        columns: std::ops::Range<usize>,
        panel: &mut [f32],
    ) {
        let depth = columns.len();
        let whole = depth - depth % 8;
        // Blocks of 8 rows × 8 columns are transposed in registers and stored a column at a time.
        for group in (0..PANEL_WIDTH).step_by(8) {
            for c in (0..whole).step_by(8) {
                let mut block = [_mm256_setzero_ps(); 8];
                for (r, lane) in block.iter_mut().enumerate().filter(|(r, _)| group + r < width) {
                    *lane = load8(dtype, weights.as_ptr().add((group + r) * row_bytes), columns.start + c);
                }
                for (t, column) in transpose8(block).into_iter().enumerate() {
                    _mm256_storeu_ps(panel.as_mut_ptr().add((c + t) * PANEL_WIDTH + group), column);
                }
            }
        }
        for r in 0..PANEL_WIDTH {
            for c in whole..depth {
                panel[c * PANEL_WIDTH + r] = if r < width {
                    element(&weights[r * row_bytes..(r + 1) * row_bytes], columns.start + c, dtype)
                } else {
                    0.0
                };
            }
        }
    }

    /// The 8×8 transpose of `rows`: element `j` of result `i` is element `i` of row `j`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
        let [a, b, c, d, e, f, g, h] = rows;
        let (ab_lo, ab_hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (cd_lo, cd_hi) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        let (ef_lo, ef_hi) = (_mm256_unpacklo_ps(e, f), _mm256_unpackhi_ps(e, f));
        let (gh_lo, gh_hi) = (_mm256_unpacklo_ps(g, h), _mm256_unpackhi_ps(g, h));
        // Per 128-bit lane, columns 0|4, 1|5, 2|6, 3|7 of rows a-d, then of rows e-h.
        let first = [
            _mm256_shuffle_ps::<0x44>(ab_lo, cd_lo),
            _mm256_shuffle_ps::<0xEE>(ab_lo, cd_lo),
            _mm256_shuffle_ps::<0x44>(ab_hi, cd_hi),
            _mm256_shuffle_ps::<0xEE>(ab_hi, cd_hi),
        ];
        let second = [
            _mm256_shuffle_ps::<0x44>(ef_lo, gh_lo),
            _mm256_shuffle_ps::<0xEE>(ef_lo, gh_lo),
            _mm256_shuffle_ps::<0x44>(ef_hi, gh_hi),
            _mm256_shuffle_ps::<0xEE>(ef_hi, gh_hi),
        ];
        let mut columns = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            columns[i] = _mm256_permute2f128_ps::<0x20>(first[i], second[i]);
            columns[i + 4] = _mm256_permute2f128_ps::<0x31>(first[i], second[i]);
        }
        columns
    }

    /// `rows` (≤ 6) input rows (stride `stride`) times a packed panel over `depth` columns:
    /// `result[i][j]` = input row `i` · panel row `j`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_product(
        panel: &[f32],
        inputs: *const f32,
        stride: usize,
        depth: usize,
        rows: usize,
    ) -> [[f32; PANEL_WIDTH]; PANEL_INPUT_ROWS] {
        // A fixed row count lets the accumulators live in registers.
        match rows {
            1 => panel_rows::<1>(panel, inputs, stride, depth),
            2 => panel_rows::<2>(panel, inputs, stride, depth),
            3 => panel_rows::<3>(panel, inputs, stride, depth),
            4 => panel_rows::<4>(panel, inputs, stride, depth),
            5 => panel_rows::<5>(panel, inputs, stride, depth),
            _ => panel_rows::<PANEL_INPUT_ROWS>(panel, inputs, stride, depth),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn panel_rows<const R: usize>(
        panel: &[f32],
        inputs: *const f32,
        stride: usize,
        depth: usize,
    ) -> [[f32; PANEL_WIDTH]; PANEL_INPUT_ROWS] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let p = panel.as_ptr();
        for c in 0..depth {
            let w0 = _mm256_loadu_ps(p.add(c * PANEL_WIDTH));
            let w1 = _mm256_loadu_ps(p.add(c * PANEL_WIDTH + 8));
            for (r, pair) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*inputs.add(r * stride + c));
                pair[0] = _mm256_fmadd_ps(w0, xv, pair[0]);
                pair[1] = _mm256_fmadd_ps(w1, xv, pair[1]);
            }
        }
        let mut result = [[0.0; PANEL_WIDTH]; PANEL_INPUT_ROWS];
        for (pair, sums) in acc.iter().zip(result.iter_mut()) {
            _mm256_storeu_ps(sums.as_mut_ptr(), pair[0]);
            _mm256_storeu_ps(sums.as_mut_ptr().add(8), pair[1]);
        }
        result
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum8(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(values: &[f32], dtype: WeightDType) -> Vec<u8> {
        match dtype {
            WeightDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WeightDType::BF16 => {
                values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect()
            }
            WeightDType::F16 => {
                values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect()
            }
        }
    }

    fn pseudo_random(count: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761) | 1;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn every_isa_and_dtype_matches_a_reference() {
        for isa in
            [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.available())
        {
            for dtype in [WeightDType::F32, WeightDType::BF16, WeightDType::F16] {
                for (m, n, k) in [
                    (1, 7, 37),
                    (3, 70, 64),
                    (17, 65, 100),
                    (130, 9, 48),
                    (1, 130, 2048),
                    (5, 11, 1100),
                    (7, 70, 300),
                    (13, 33, 600),
                ] {
                    let values = pseudo_random(n * k, (m * n * k) as u32);
                    let bytes = encode(&values, dtype);
                    // The reference uses the stored (rounded) weights.
                    let stored: Vec<f64> = (0..n * k).map(|i| f64::from(element(&bytes, i, dtype))).collect();
                    let len = bytes.len();
                    let w = WeightMatrix::new(Arc::new(bytes), 0..len, n, k, dtype).unwrap();
                    let x = pseudo_random(m * k, 99);
                    let bias = pseudo_random(n, 7);
                    for with_bias in [false, true] {
                        let mut out = vec![0.0; m * n];
                        linear_with(isa, &x, &w, with_bias.then_some(&bias[..]), &mut out).unwrap();
                        for r in 0..m {
                            for c in 0..n {
                                let mut expected: f64 =
                                    (0..k).map(|i| stored[c * k + i] * f64::from(x[r * k + i])).sum();
                                if with_bias {
                                    expected += f64::from(bias[c]);
                                }
                                let got = f64::from(out[r * n + c]);
                                // The BF16 dot-product path rounds activations to bf16 (8 bits).
                                let rounded = isa == Isa::Avx512Bf16 && dtype == WeightDType::BF16 && m > 1;
                                let tolerance = (if rounded { 4e-3 } else { 1e-4 }) * (k as f64).sqrt();
                                assert!(
                                    (got - expected).abs() < tolerance,
                                    "{isa:?} {dtype:?} m{m} n{n} k{k}: {got} vs {expected}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let w = WeightMatrix::new(Arc::new(vec![0u8; 24]), 0..24, 2, 3, WeightDType::F32).unwrap();
        let mut out = vec![0.0; 2];
        assert!(linear(&[1.0; 4], &w, None, &mut out).is_err());
        assert!(linear(&[1.0; 3], &w, Some(&[0.0; 3]), &mut out).is_err());
        assert!(WeightMatrix::new(Arc::new(vec![0u8; 24]), 0..24, 2, 4, WeightDType::F32).is_err());
        assert!(WeightMatrix::new(Arc::new(vec![0u8; 24]), 8..32, 2, 3, WeightDType::F32).is_err());
    }
}
