//! The x86-64 kernels: AVX-512 (with BF16 dot products where the CPU has them) and
//! AVX2 + FMA + F16C dot products, tiles and packed panels. Every function needs the
//! instruction sets it enables; the callers check them.

use std::arch::x86_64::*;

use super::avx2::{PANEL_INPUT_ROWS, PANEL_WIDTH};
use super::matrix::{element, WeightDType};
use super::{ROW_BLOCK, WEIGHT_BLOCK};

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
    let size = dtype.size();
    while i + 32 <= k {
        super::prefetch_ahead(w.add(i * size), 32 * size);
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
                w.add(j * row_bytes + 2 * i) as *const _
            ));
        }
        for r in 0..ROWS {
            let xv =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.add(r * k + i) as *const _));
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
/// columns (a multiple of 16), added to `out`: [`super::avx2::AVX2_DECODE_WEIGHT_ROWS`] rows per
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
    const ROWS: usize = super::avx2::AVX2_DECODE_WEIGHT_ROWS;
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
