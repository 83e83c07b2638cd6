//! `y = x Wᵀ` for block-quantized weights, read in place: each input row is first quantized
//! to 8 bits per 32 values (as llama.cpp quantizes activations for its q8 dot products), then
//! every 4 codes of a weight row are dotted with 4 activation codes in integers and the
//! lane's sum is scaled in f32. Decoding reads about a quarter (Q8_0: half) of the bytes of
//! bf16 weights per token, which is what bounds its speed.
//!
//! Rounding the activations costs at most half a step of 1/127 of each 32 values' largest
//! magnitude per value; a dot product's error is then bounded by
//! `Σ_blocks max|x_block| / 254 · Σ|w_block|`.

use rayon::prelude::*;

use super::blocks::{chunks, decode_chunk, BlockMatrix, BlockType, CHUNK, LANES};
use super::{check_product, Isa, OutPtr, ROWS_PER_TASK};
use crate::error::Result;

/// Input rows quantized for the block kernels, each padded to whole chunks.
pub struct QuantizedInput {
    /// 8-bit codes, `chunks · 64` per row.
    pub codes: Vec<i8>,
    /// Per lane (4 codes): the scale of the codes' block of 32.
    pub scales: Vec<f32>,
    /// Per lane: the scale times the sum of the lane's 4 codes (for the weights' offsets).
    pub scaled_sums: Vec<f32>,
    /// Chunks per row.
    pub chunks: usize,
}

impl QuantizedInput {
    /// Quantizes the `x.len() / cols` rows of `x`.
    pub fn new(x: &[f32], cols: usize) -> Self {
        let per_row = chunks(cols);
        let rows = x.len() / cols;
        let mut codes = vec![0i8; rows * per_row * CHUNK];
        let mut scales = vec![0f32; rows * per_row * LANES];
        let mut scaled_sums = vec![0f32; rows * per_row * LANES];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            for (b, block) in row.chunks(32).enumerate() {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let at = r * per_row * CHUNK + b * 32;
                for (code, value) in codes[at..at + block.len()].iter_mut().zip(block) {
                    *code = (value * inverse).round() as i8;
                }
                for lane in 0..8 {
                    let sum: i32 = codes[at + 4 * lane..at + 4 * lane + 4].iter().map(|&c| c as i32).sum();
                    let l = (r * per_row * CHUNK + b * 32) / 4 + lane;
                    scales[l] = scale;
                    scaled_sums[l] = scale * sum as f32;
                }
            }
        }
        Self { codes, scales, scaled_sums, chunks: per_row }
    }

    /// Row `r`'s codes, lane scales and lane scaled sums.
    pub fn row(&self, r: usize) -> (&[i8], &[f32], &[f32]) {
        let (c, l) = (self.chunks * CHUNK, self.chunks * LANES);
        (
            &self.codes[r * c..(r + 1) * c],
            &self.scales[r * l..(r + 1) * l],
            &self.scaled_sums[r * l..(r + 1) * l],
        )
    }
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` for a block matrix, with the best instruction set.
pub fn linear_blocks(x: &[f32], w: &BlockMatrix, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    linear_blocks_with(Isa::detect(), x, w, bias, out)
}

/// [`linear_blocks`] with a chosen instruction set (tests force each one); the AVX-512 paths
/// need VNNI, AVX2 takes the portable path.
pub fn linear_blocks_with(
    isa: Isa,
    x: &[f32],
    w: &BlockMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_product(isa, x, (n, k), bias, out)?;
    let m = x.len() / k;
    let input = QuantizedInput::new(x, k);
    let vnni = matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) && vnni_available();
    let row_bytes = w.block_type().row_bytes(k);
    let data = w.data();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let mut dots = [0f32; ROW_BLOCK];
        for row in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n) {
            let weights = &data[row * row_bytes..(row + 1) * row_bytes];
            let add = bias.map_or(0.0, |b| b[row]);
            for first in (0..m).step_by(ROW_BLOCK) {
                let count = ROW_BLOCK.min(m - first);
                dot_rows(vnni, w.block_type(), weights, k, &input, first..first + count, &mut dots[..count]);
                for (i, dot) in dots[..count].iter().enumerate() {
                    // SAFETY: (first + i, row) is inside `out`; no other task writes this row.
                    unsafe { *out_ptr.get().add((first + i) * n + row) = dot + add };
                }
            }
        }
    });
    Ok(())
}

/// Input rows dotted with one weight row at a time (the weight row's decoded chunks are
/// reused across them).
const ROW_BLOCK: usize = 8;

/// Whether this CPU runs the block kernels' SIMD path (AVX-512BW with VNNI 8-bit dot
/// products); elsewhere the portable path is slower than candle's AVX2 quantized kernels.
pub fn block_kernels_accelerated() -> bool {
    vnni_available()
}

/// Whether the CPU has AVX-512 VNNI (8-bit dot products) beside AVX-512BW.
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dots of one weight row (`k` weights of `block_type`) with the input rows `rows`.
fn dot_rows(
    vnni: bool,
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: std::ops::Range<usize>,
    dots: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // SAFETY: AVX-512F/BW/VNNI (and so F16C) were checked; `weights` is one row of `k` weights and
        // every input row holds `input.chunks` chunks.
        return unsafe { super::x86_blocks::dot_rows(block_type, weights, k, input, rows, dots) };
    }
    let _ = vnni;
    dot_rows_portable(block_type, weights, k, input, rows, dots);
}

/// The portable dots: each chunk decoded, then integer lane sums scaled in f32.
pub(super) fn dot_rows_portable(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: std::ops::Range<usize>,
    dots: &mut [f32],
) {
    dots.fill(0.0);
    for c in 0..chunks(k) {
        let chunk = decode_chunk(block_type, weights, k, c);
        for (dot, r) in dots.iter_mut().zip(rows.clone()) {
            let (codes, scales, scaled_sums) = input.row(r);
            for lane in 0..LANES {
                let at = c * CHUNK + 4 * lane;
                let sum: i32 = (0..4).map(|i| chunk.q[4 * lane + i] as i32 * codes[at + i] as i32).sum();
                let l = c * LANES + lane;
                *dot += sum as f32 * chunk.a[lane] * scales[l] + chunk.b[lane] * scaled_sums[l];
            }
        }
    }
}
