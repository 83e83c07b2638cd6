//! Products of K-format blocks (Q4_K, Q5_K, Q6_K) with many input rows at once (a prompt, a
//! batch), on AVX-512 VNNI.
//!
//! The activations are rounded to 14-bit codes with one scale per 256 values, and each weight
//! block is decoded into 16-bit codes already multiplied by their integer group scales. A
//! block's 256 products with one input row then sum in integers (eight `vpdpwssd`) and cost one
//! conversion and two FMAs: the block's scale, and its groups' offsets against the row's sums
//! per 16 values. [`super::x86_blocks`] instead spends a conversion, a permute and an FMA per
//! 64 products, which bounds a prompt's speed once the weights sit in cache.
//!
//! A task decodes its weight rows' blocks of [`TILE_COLS`] columns once into a buffer, then
//! every tile of [`TILE_ROWS`] input rows meets them [`TILE_WEIGHTS`] rows at a time: each
//! register of weights loaded meets `TILE_ROWS` rows, each of activations `TILE_WEIGHTS`.
//!
//! Rounding costs at most half a step of 1/8191 of each 256 values' largest magnitude per
//! value, far below the 8-bit codes' step of 1/127 per 32 values unless one value in 256 is
//! 64 times the largest of its 32 neighbours. Lane sums stay below 2³¹: 16 products per lane
//! and block of codes at most 8191 with weights at most 63·128 in magnitude (Q6_K).

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use rayon::prelude::*;

use super::blocks::{BlockMatrix, BlockType};
use super::x86_blocks::{half_at, k_codes, k_parameters, k_scale_and_min_bytes};
use super::{OutPtr, ROWS_PER_TASK};

/// Largest activation code (see the module's overflow bound).
const CODE_MAX: f32 = 8191.0;
/// Values per activation scale: one K block.
const BLOCK: usize = 256;
/// Input rows of a full tile.
const TILE_ROWS: usize = 3;
/// Weight rows of a full tile (with the input rows: 12 accumulators, 12 partial sums).
const TILE_WEIGHTS: usize = 4;
/// Columns decoded at a time (a task's buffer of 256 KB stays in L2).
const TILE_COLS: usize = 2048;
/// Blocks of a row decoded at a time.
const TILE_BLOCKS: usize = TILE_COLS / BLOCK;
/// Input rows from which a product takes this path: with fewer, decoding each block costs more
/// than the products gain (`benches/kernels.rs`, one thread: at 12 rows Q4_K and Q6_K run 7-28%
/// faster here than on the 8-row block kernel, at 9 rows -6% to +14%, at 8 rows alike).
pub const MIN_ROWS: usize = 12;

/// For each of a block's 8 registers of 32 weights, the lane of the group scale each weight
/// takes: Q4_K/Q5_K have a scale per 32 weights (lanes 0-7), Q6_K per 16 (lanes 0-15).
const SCALE_LANES_32: [[i16; 32]; 8] = scale_lanes(32);
const SCALE_LANES_16: [[i16; 32]; 8] = scale_lanes(16);

const fn scale_lanes(group: usize) -> [[i16; 32]; 8] {
    let mut table = [[0; 32]; 8];
    let mut weight = 0;
    while weight < BLOCK {
        table[weight / 32][weight % 32] = (weight / group) as i16;
        weight += 1;
    }
    table
}

/// Input rows as 14-bit codes with a scale per 256 values, and per 16 values the scale
/// times the codes' sum (for the weights' offsets).
struct WideInput {
    codes: Vec<i16>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    /// Codes per row: the columns and one cache line, so that a tile's rows do not all fall
    /// in the same L1 set when the columns are a multiple of 2048.
    stride: usize,
    /// Blocks per row.
    blocks: usize,
}

impl WideInput {
    /// Rounds the `x.len() / cols` rows of `x` (`cols` a multiple of 256).
    fn new(x: &[f32], cols: usize) -> Self {
        let rows = x.len() / cols;
        let stride = cols + 32;
        let mut input = Self {
            codes: vec![0; rows * stride],
            scales: vec![0.0; rows * cols / BLOCK],
            sums: vec![0.0; rows * cols / 16],
            stride,
            blocks: cols / BLOCK,
        };
        let codes = input.codes.chunks_exact_mut(stride).flat_map(|row| row[..cols].chunks_exact_mut(BLOCK));
        let per_block = input.scales.iter_mut().zip(input.sums.chunks_exact_mut(BLOCK / 16));
        for ((values, codes), (scale, sums)) in x.chunks_exact(BLOCK).zip(codes).zip(per_block) {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = max / CODE_MAX;
            let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
            for (code, value) in codes.iter_mut().zip(values) {
                *code = (value * inverse).round() as i16;
            }
            for (sum, group) in sums.iter_mut().zip(codes.chunks_exact(16)) {
                *sum = *scale * group.iter().map(|&c| c as i32).sum::<i32>() as f32;
            }
        }
        input
    }
}

/// A task's weight rows decoded for one column tile: per row and block, 8 registers of
/// scaled codes, the block's scale and its offsets (see [`wide_block`]).
struct DecodedTile {
    codes: Vec<__m512i>,
    scales: Vec<f32>,
    offsets: Vec<__m512>,
}

impl DecodedTile {
    /// A buffer for a task's rows.
    fn new() -> Self {
        // SAFETY: the vector types are plain bits, for which zeros are a value.
        let (codes, offsets) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        Self {
            codes: vec![codes; ROWS_PER_TASK * TILE_BLOCKS * 8],
            scales: vec![0.0; ROWS_PER_TASK * TILE_BLOCKS],
            offsets: vec![offsets; ROWS_PER_TASK * TILE_BLOCKS],
        }
    }

    /// Decodes `blocks` of each of `rows` (row after row, `row_bytes` each, of `block_type`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn fill(&mut self, block_type: BlockType, rows: &[u8], row_bytes: usize, blocks: Range<usize>) {
        for (w, row) in rows.chunks_exact(row_bytes).enumerate() {
            for (i, b) in blocks.clone().enumerate() {
                let at = w * TILE_BLOCKS + i;
                let (codes, d, offsets) =
                    wide_block(block_type, row.as_ptr().add(b * block_type.block_bytes()));
                self.codes[8 * at..8 * at + 8].copy_from_slice(&codes);
                self.scales[at] = d;
                self.offsets[at] = offsets;
            }
        }
    }
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` for a K-format `w`; the caller checked the shapes
/// and that the CPU has AVX-512F, BW and VNNI.
pub unsafe fn linear(x: &[f32], w: &BlockMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let m = x.len() / k;
    let input = WideInput::new(x, k);
    let row_bytes = w.block_type().row_bytes(k);
    let data = w.data();
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each_init(DecodedTile::new, |decoded, task| {
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
        for cols in (0..k).step_by(TILE_COLS) {
            let blocks = cols / BLOCK..(cols + TILE_COLS).min(k) / BLOCK;
            // SAFETY: the caller checked the CPU; the rows are whole rows of `k` weights.
            unsafe {
                decoded.fill(
                    w.block_type(),
                    &data[rows.start * row_bytes..rows.end * row_bytes],
                    row_bytes,
                    blocks.clone(),
                )
            };
            let mut first = 0;
            while first < m {
                let count = TILE_ROWS.min(m - first);
                let mut group = 0;
                while group < rows.len() {
                    let width = if rows.len() - group >= TILE_WEIGHTS { TILE_WEIGHTS } else { 1 };
                    let mut dots = [[0f32; TILE_ROWS]; TILE_WEIGHTS];
                    // SAFETY: the CPU was checked; `decoded` holds rows `group..group + width` and
                    // `input` rows `first..first + count`.
                    unsafe { tile(decoded, group, width, blocks.clone(), &input, first, count, &mut dots) };
                    for (j, dots) in dots[..width].iter().enumerate() {
                        let row = rows.start + group + j;
                        for (i, dot) in dots[..count].iter().enumerate() {
                            // SAFETY: (first + i, row) is inside `out`; no other task writes this row.
                            unsafe {
                                let slot = out_ptr.get().add((first + i) * n + row);
                                *slot =
                                    if cols == 0 { dot + bias.map_or(0.0, |b| b[row]) } else { *slot + dot };
                            }
                        }
                    }
                    group += width;
                }
                first += count;
            }
        }
    });
}

/// Dots of decoded weight rows `group..group + width` with input rows `first..first + count`
/// over `blocks`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile(
    decoded: &DecodedTile,
    group: usize,
    width: usize,
    blocks: Range<usize>,
    input: &WideInput,
    first: usize,
    count: usize,
    dots: &mut [[f32; TILE_ROWS]; TILE_WEIGHTS],
) {
    // One copy per tile shape, so that the accumulators live in registers.
    match (width, count) {
        (TILE_WEIGHTS, TILE_ROWS) => {
            tile_of::<TILE_WEIGHTS, TILE_ROWS>(decoded, group, blocks, input, first, dots)
        }
        (TILE_WEIGHTS, 2) => tile_of::<TILE_WEIGHTS, 2>(decoded, group, blocks, input, first, dots),
        (TILE_WEIGHTS, _) => tile_of::<TILE_WEIGHTS, 1>(decoded, group, blocks, input, first, dots),
        (_, TILE_ROWS) => tile_of::<1, TILE_ROWS>(decoded, group, blocks, input, first, dots),
        (_, 2) => tile_of::<1, 2>(decoded, group, blocks, input, first, dots),
        _ => tile_of::<1, 1>(decoded, group, blocks, input, first, dots),
    }
}

/// [`tile`] for `W` weight rows and `R` input rows: each loaded register of weights or
/// activations meets `R` or `W` others.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile_of<const W: usize, const R: usize>(
    decoded: &DecodedTile,
    group: usize,
    blocks: Range<usize>,
    input: &WideInput,
    first: usize,
    dots: &mut [[f32; TILE_ROWS]; TILE_WEIGHTS],
) {
    let mut acc = [[_mm512_setzero_ps(); R]; W];
    for (i, b) in blocks.enumerate() {
        let at: [usize; W] = std::array::from_fn(|w| (group + w) * TILE_BLOCKS + i);
        // Per input row: its codes of block `b`, and the index of the block's scale.
        let x: [*const i16; R] =
            std::array::from_fn(|r| input.codes.as_ptr().add((first + r) * input.stride + BLOCK * b));
        let scale_at: [usize; R] = std::array::from_fn(|r| (first + r) * input.blocks + b);
        let mut dot = [[_mm512_setzero_si512(); R]; W];
        for j in 0..8 {
            let codes: [__m512i; R] =
                std::array::from_fn(|r| _mm512_loadu_si512(x[r].add(32 * j) as *const _));
            for (dot, &at) in dot.iter_mut().zip(&at) {
                let weights = *decoded.codes.get_unchecked(8 * at + j);
                for (sum, codes) in dot.iter_mut().zip(codes) {
                    *sum = dot_pairs(*sum, weights, codes);
                }
            }
        }
        for ((acc, dot), &at) in acc.iter_mut().zip(dot).zip(&at) {
            let d = _mm512_set1_ps(*decoded.scales.get_unchecked(at));
            let offsets = *decoded.offsets.get_unchecked(at);
            for ((sum, dot), &x_at) in acc.iter_mut().zip(dot).zip(&scale_at) {
                let scaled =
                    _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(*input.scales.get_unchecked(x_at)));
                *sum = _mm512_fmadd_ps(scaled, d, *sum);
                *sum = _mm512_fmadd_ps(offsets, _mm512_loadu_ps(input.sums.as_ptr().add(16 * x_at)), *sum);
            }
        }
    }
    for (dots, acc) in dots.iter_mut().zip(acc) {
        for (dot, sum) in dots.iter_mut().zip(acc) {
            *dot = _mm512_reduce_add_ps(sum);
        }
    }
}

/// `acc` plus the products of `w` with the 32 codes `x`, summed in pairs: `vpdpwssd`
/// itself, which LLVM would otherwise split into a multiply-add and an add (twice the uops)
/// on CPUs it does not know to run it fast.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn dot_pairs(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: the caller checked VNNI.
    asm!(
        "vpdpwssd {acc}, {w}, {x}",
        acc = inout(zmm_reg) acc,
        w = in(zmm_reg) w,
        x = in(zmm_reg) x,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// A K block's 256 codes times their integer group scales as 16-bit values (8 registers of
/// 32, in weight order), its scale `d` and its 16 per-group-of-16 offsets: a weight is
/// `d·code + offset`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn wide_block(block_type: BlockType, block: *const u8) -> ([__m512i; 8], f32, __m512) {
    let (_, offsets) = k_parameters(block_type, block);
    let (scales, lanes, d) = if block_type == BlockType::Q6K {
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(192) as *const __m128i));
        (scales, &SCALE_LANES_16, half_at(block.add(208)))
    } else {
        let (scales, _) = k_scale_and_min_bytes(block);
        (_mm256_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)), &SCALE_LANES_32, half_at(block))
    };
    let scales = _mm512_castsi256_si512(scales);
    let mut codes = [_mm512_setzero_si512(); 8];
    for part in 0..4 {
        let q = k_codes(block_type, block, part);
        let halves = [_mm512_castsi512_si256(q), _mm512_extracti64x4_epi64(q, 1)];
        for (half, bytes) in halves.into_iter().enumerate() {
            let j = 2 * part + half;
            let lane_scales =
                _mm512_permutexvar_epi16(_mm512_loadu_si512(lanes[j].as_ptr() as *const _), scales);
            codes[j] = _mm512_mullo_epi16(_mm512_cvtepu8_epi16(bytes), lane_scales);
        }
    }
    (codes, d, offsets)
}
