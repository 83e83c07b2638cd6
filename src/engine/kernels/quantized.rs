//! `y = x Wᵀ` for block-quantized weights, read in place: each input row is first rounded
//! to 8-bit codes per 32 values (as llama.cpp quantizes activations for its q8_0 dot
//! products), then dotted with the weight codes in integers, each 32 values' sum scaled in
//! f32 and the weights' offsets applied once per 16 values.
//! Decoding reads about a quarter (Q8_0: half) of the bytes of bf16 weights per token, which
//! is what bounds its speed.
//!
//! Rounding costs at most half a step of 1/127 of each 32 values' largest magnitude per
//! value; a dot product's error is then bounded by `Σ_blocks max|x_block| / 254 · Σ|w_block|`.
//! (Quantizing per 256 values instead, as llama.cpp's Q8_K does for the K formats, lets a
//! whole weight block be summed in integers, but moved the greedy tokens of the Q5_K test
//! model away from its dequantized weights' in `tests/test_gguf_engine.py`.) A product of a
//! K format with many input rows (a prompt) on AVX-512 VNNI takes
//! [`super::x86_prompt_blocks`] instead: 14-bit codes per 256 values, finer than these. On a
//! CPU with AMX, a product of any block format with [`super::x86_amx::MIN_BLOCK_ROWS`] rows
//! or more takes [`super::x86_amx`] (weights decoded to bf16, activations rounded to bf16).

use rayon::prelude::*;

use super::blocks::{decode_k_block, decode_small_block, BlockMatrix, BlockType, K_GROUP};
use super::{check_product, Isa, OutPtr, ROWS_PER_TASK};
use crate::error::Result;

/// Weights the SIMD kernels read at a time (one 512-bit register of 8-bit codes).
pub const CHUNK: usize = 64;

/// Input rows quantized for one block format's kernels: 8-bit codes with one scale per 32
/// values, each row padded to whole chunks.
///
/// For Q8_0/Q4_0, `codes` hold `x + 128` (unsigned, so the signed weight codes meet them in
/// `vpdpbusd`); for the K formats, signed `x`, and `sums` hold per 16 values the scale times
/// the codes' sum (for the weights' offsets). `scales` are padded with zeros to a multiple
/// of 8 (256 values).
pub struct QuantizedInput {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub sums: Vec<f32>,
    /// Codes, scales and sums per row.
    strides: (usize, usize, usize),
}

impl QuantizedInput {
    /// Quantizes the `x.len() / cols` rows of `x` for weights of `block_type`.
    pub fn new(x: &[f32], cols: usize, block_type: BlockType) -> Self {
        let small = block_type.block_weights() == 32;
        let blocks = cols / 32;
        let sums = if small { 0 } else { cols / K_GROUP };
        let strides = (cols.div_ceil(CHUNK) * CHUNK, blocks.div_ceil(8) * 8, sums);
        let rows = x.len() / cols;
        // Signed codes for the K formats' unsigned weights; codes + 128 for Q8_0/Q4_0's signed ones.
        let flip = if small { 0x80 } else { 0 };
        let mut input = Self {
            codes: vec![flip; rows * strides.0],
            scales: vec![0.0; rows * strides.1],
            sums: vec![0.0; rows * strides.2],
            strides,
        };
        let mut block_codes = [0i8; 32];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            for (b, block) in row.chunks_exact(32).enumerate() {
                let scale = quantize(block, &mut block_codes);
                input.scales[r * strides.1 + b] = scale;
                for (code, &q) in input.codes[r * strides.0 + 32 * b..][..32].iter_mut().zip(&block_codes) {
                    *code = q as u8 ^ flip;
                }
                if !small {
                    let sums = &mut input.sums[r * strides.2 + 2 * b..][..2];
                    for (sum, group) in sums.iter_mut().zip(block_codes.chunks_exact(K_GROUP)) {
                        *sum = scale * group.iter().map(|&q| q as i32).sum::<i32>() as f32;
                    }
                }
            }
        }
        input
    }

    /// Row `r`'s codes, scales and sums.
    pub fn row(&self, r: usize) -> (&[u8], &[f32], &[f32]) {
        let (c, s, g) = self.strides;
        (&self.codes[r * c..(r + 1) * c], &self.scales[r * s..(r + 1) * s], &self.sums[r * g..(r + 1) * g])
    }
}

/// Rounds `values` to codes in [-127, 127] (`codes`); returns the scale (largest magnitude / 127).
pub(super) fn quantize(values: &[f32], codes: &mut [i8]) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (code, value) in codes.iter_mut().zip(values) {
        *code = (value * inverse).round() as i8;
    }
    scale
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
    let vnni = isa.has_avx512() && vnni_available();
    #[cfg(target_arch = "x86_64")]
    if takes_amx(isa, m, n, k) {
        // SAFETY: AMX was granted (`Isa::Amx` is available) and VNNI checked; `fits` checked
        // the shape and `check_product` the slices.
        unsafe { super::x86_amx::linear_blocks(x, w, bias, out) };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if takes_prompt_kernel(isa, w.block_type(), m) {
        // SAFETY: AVX-512F/BW/VNNI were checked, and the shapes by `check_product`.
        unsafe { super::x86_prompt_blocks::linear(x, w, bias, out) };
        return Ok(());
    }
    let input = QuantizedInput::new(x, k, w.block_type());
    let row_bytes = w.block_type().row_bytes(k);
    let data = w.data();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let mut dots = [0f32; ROW_BLOCK];
        // Input rows outer: a block of them stays in L1 while the task's weight rows pass.
        for first in (0..m).step_by(ROW_BLOCK) {
            let count = ROW_BLOCK.min(m - first);
            for row in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n) {
                let weights = &data[row * row_bytes..(row + 1) * row_bytes];
                dot_rows(vnni, w.block_type(), weights, k, &input, first..first + count, &mut dots[..count]);
                let add = bias.map_or(0.0, |b| b[row]);
                for (i, dot) in dots[..count].iter().enumerate() {
                    // SAFETY: (first + i, row) is inside `out`; no other task writes this row.
                    unsafe { *out_ptr.get().add((first + i) * n + row) = dot + add };
                }
            }
        }
    });
    Ok(())
}

/// Whether a product of `rows` input rows with `[n, k]` block or affine weights on `isa`
/// takes AMX tiles (x86-64 only).
pub(super) fn takes_amx(isa: Isa, rows: usize, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Amx
            && vnni_available()
            && rows >= super::x86_amx::MIN_BLOCK_ROWS
            && super::x86_amx::fits(n, k)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, rows, n, k);
        false
    }
}

/// Whether a product of `rows` input rows with `block_type` weights on `isa` takes the K
/// formats' prompt kernel (x86-64 with AVX-512 VNNI only).
pub(super) fn takes_prompt_kernel(isa: Isa, block_type: BlockType, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa.has_avx512()
            && vnni_available()
            && block_type.block_weights() == 256
            && rows >= super::x86_prompt_blocks::MIN_ROWS
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, block_type, rows);
        false
    }
}

/// Input rows dotted with one weight row at a time (each decoded weight block is reused
/// across them).
pub const ROW_BLOCK: usize = 8;

/// Whether this CPU runs the block kernels' SIMD path (AVX-512BW with VNNI 8-bit dot
/// products); elsewhere the portable path is slower than candle's AVX2 quantized kernels.
pub fn block_kernels_accelerated() -> bool {
    vnni_available()
}

/// Whether the CPU has AVX-512 VNNI (8-bit dot products) beside AVX-512BW.
pub(super) fn vnni_available() -> bool {
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

/// The portable dots: each block decoded, its products summed in integers and scaled in f32.
pub(super) fn dot_rows_portable(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: std::ops::Range<usize>,
    dots: &mut [f32],
) {
    dots.fill(0.0);
    let (size, block_bytes) = (block_type.block_weights(), block_type.block_bytes());
    for (b, bytes) in weights.chunks_exact(block_bytes).take(k / size).enumerate() {
        if size == 32 {
            let block = decode_small_block(block_type, bytes);
            for (dot, r) in dots.iter_mut().zip(rows.clone()) {
                let (codes, scales, _) = input.row(r);
                let x = &codes[32 * b..32 * b + 32];
                let sum: i32 = block.q.iter().zip(x).map(|(&q, &c)| q as i32 * (c ^ 0x80) as i8 as i32).sum();
                *dot += block.d * scales[b] * sum as f32;
            }
            continue;
        }
        let block = decode_k_block(block_type, bytes);
        for (dot, r) in dots.iter_mut().zip(rows.clone()) {
            let (codes, scales, sums) = input.row(r);
            for (g, &scale) in block.scales.iter().enumerate() {
                let at = 256 * b + K_GROUP * g;
                let products: i32 = block.q[K_GROUP * g..K_GROUP * (g + 1)]
                    .iter()
                    .zip(&codes[at..at + K_GROUP])
                    .map(|(&q, &c)| q as i32 * c as i8 as i32)
                    .sum();
                *dot += block.d * scale as f32 * scales[at / 32] * products as f32;
                *dot += block.offsets[g] * sums[at / K_GROUP];
            }
        }
    }
}
