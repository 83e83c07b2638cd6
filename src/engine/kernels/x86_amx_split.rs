//! f32 products on AMX tiles, for the frozen weights of fine-tuning: each f32 value is split
//! into a bf16 `hi` and the bf16 rounding of what it leaves, `lo` (16 of f32's 24 significant
//! bits between them), and a product `x·w` becomes `hi·hi + hi·lo + lo·hi` (the "bf16x3" split
//! oneDNN offers as an f32 math mode), three bf16 tile products summed in f32. What is dropped
//! (`lo·lo` and each split's remainder) is about 2⁻¹⁶ of `|x·w|`, where rounding to one bf16
//! would lose 2⁻⁹; the tests hold both kernels to `Σ|x·w|·2⁻¹⁵` of the f64 product.
//!
//! Two orientations, for a layer's forward product and its input's gradient:
//! - [`linear`]: `out = x · Wᵀ`. The weight rows, split to `[hi | lo | hi]`, meet input rows
//!   split to `[hi | hi | lo]` in [`super::x86_amx`]'s bf16 kernel over three times the
//!   columns.
//! - [`gradient`]: `out = g · W`. Here the sum runs over `W`'s rows, so `W` is the second
//!   operand of `tdpbf16ps`, whose lines pair two consecutive rows: each task packs 32 of
//!   `W`'s columns, a chunk of rows at a time, into tiles of `hi` and of `lo`, and the
//!   gradient's rows, split to `[hi | hi | lo]`, are the first operand, loaded in place.

use std::arch::asm;
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::x86_amx::{for_each_task, TileConfig, STEP, TILE};

/// Output columns packed and summed together in [`gradient`]: two tiles.
const TASK_COLUMNS: usize = 2 * TILE;

/// Whether `[n, k]` f32 weights take these kernels: whole tiles both ways.
pub fn fits(n: usize, k: usize) -> bool {
    n.is_multiple_of(STEP) && k.is_multiple_of(STEP) && n > 0 && k > 0
}

/// `value` as `(hi, lo)` bf16 bits: `hi` rounds it, `lo` rounds what `hi` leaves.
fn split(value: f32) -> (u16, u16) {
    let hi = half::bf16::from_f32(value);
    (hi.to_bits(), half::bf16::from_f32(value - hi.to_f32()).to_bits())
}

/// Rows of `k` values split and laid out as `[hi | hi | lo]`, as f32 values that bf16 holds
/// exactly (so rounding them to bf16 again changes nothing).
fn split_rows_hi_hi_lo(x: &[f32], k: usize) -> Vec<f32> {
    let widen = |bits: u16| half::bf16::from_bits(bits).to_f32();
    let mut out = vec![0f32; 3 * x.len()];
    for (row, values) in out.chunks_exact_mut(3 * k).zip(x.chunks_exact(k)) {
        for (c, &v) in values.iter().enumerate() {
            let (hi, lo) = split(v);
            (row[c], row[k + c], row[2 * k + c]) = (widen(hi), widen(hi), widen(lo));
        }
    }
    out
}

/// The bf16 rounding of 16 values and the rounding of what it leaves.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn split16(values: __m512) -> (__m256i, __m256i) {
    let hi = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(values));
    let hi_wide = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
    let lo = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(values, hi_wide)));
    (hi, lo)
}

/// `out[m, n] = x[m, k] · Wᵀ` for row-major f32 `w` (`[n, k]`) that [`fits`]. The caller
/// checked the slices' lengths and that AMX is usable.
pub unsafe fn linear(x: &[f32], w: &[f32], (n, k): (usize, usize), out: &mut [f32]) {
    let split_x = split_rows_hi_hi_lo(x, k);
    for_each_task(&split_x, n, 3 * k, None, out, |task, decoded| {
        decoded.resize(2 * TILE * 3 * k, 0);
        let rows = &w[task * 2 * TILE * k..(task + 1) * 2 * TILE * k];
        for (split_row, values) in decoded.chunks_exact_mut(3 * k).zip(rows.chunks_exact(k)) {
            // SAFETY: the caller checked AVX-512 BF16 (AMX's CPUs have it); `split_row` holds `3k`.
            unsafe { split_row_hi_lo_hi(split_row, values) };
        }
        decoded.as_ptr() as *const u8
    });
}

/// `row` (`k` values, `k` a multiple of 16) split into `out` as `[hi | lo | hi]`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn split_row_hi_lo_hi(out: &mut [u16], row: &[f32]) {
    let k = row.len();
    assert!(out.len() >= 3 * k && k.is_multiple_of(16), "a split row needs 3k values of room");
    for c in (0..k).step_by(16) {
        let (hi, lo) = split16(_mm512_loadu_ps(row.as_ptr().add(c)));
        let at = out.as_mut_ptr().add(c);
        _mm256_storeu_si256(at as *mut __m256i, hi);
        _mm256_storeu_si256(at.add(k) as *mut __m256i, lo);
        _mm256_storeu_si256(at.add(2 * k) as *mut __m256i, hi);
    }
}

/// `out[m, k] = g[m, n] · W` for row-major f32 `w` (`[n, k]`) that [`fits`]. The caller
/// checked the slices' lengths and that AMX is usable.
///
/// Each thread takes a run of `W`'s rows and sums their share of every output into a buffer
/// of its own, added up at the end: packing columns reads each row 128 bytes at a time, which
/// stays in cache and in the TLB's reach only within a chunk of consecutive rows (a task per
/// column tile walking all of the LM head's rows spent a third of a training step there).
pub unsafe fn gradient(g: &[f32], w: &[f32], (n, k): (usize, usize), out: &mut [f32]) {
    let m = g.len() / n;
    // The gradient's rows split to [hi | hi | lo], padded with zero rows to pairs of tiles.
    let groups = m.div_ceil(TILE).next_multiple_of(2);
    let mut split_g = vec![0u16; groups * TILE * 3 * n];
    for (row, values) in split_g.chunks_exact_mut(3 * n).zip(g.chunks_exact(n)) {
        for (c, &v) in values.iter().enumerate() {
            let (hi, lo) = split(v);
            (row[c], row[n + c], row[2 * n + c]) = (hi, hi, lo);
        }
    }
    let chunk_rows = chunk_rows(k);
    let chunks = n.div_ceil(chunk_rows);
    let parts = rayon::current_num_threads().clamp(1, chunks);
    // Per part: for each column tile, its sums as rows of 32 (`groups·16` of them).
    let tile_sums = groups * TILE * TASK_COLUMNS;
    let sums: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut sums = vec![0f32; k / TASK_COLUMNS * tile_sums];
            let mut packed = vec![0u16; 2 * chunk_rows * TASK_COLUMNS];
            let (hi, lo) = packed.split_at_mut(chunk_rows * TASK_COLUMNS);
            let config = TileConfig::uniform();
            // SAFETY: the caller checked AMX; the configuration is loaded before any tile is used.
            unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
            for chunk in part * chunks / parts..(part + 1) * chunks / parts {
                let first = chunk * chunk_rows;
                let rows = chunk_rows.min(n - first);
                for (tile, sums) in sums.chunks_exact_mut(tile_sums).enumerate() {
                    // SAFETY: AVX-512 BF16 comes with AMX; rows `first..first + rows` and
                    // columns `tile·32..+32` lie inside `w`, and each pack holds `rows·32`.
                    unsafe { pack_columns(w, k, first..first + rows, tile * TASK_COLUMNS, hi, lo) };
                    for pair in (0..groups).step_by(2) {
                        // SAFETY: the gradient's tiles lie inside `split_g` (rows of groups
                        // `pair`, `pair + 1`; columns `first..first + rows` of each third), the
                        // packs hold `rows / 32` steps of two tiles, `sums` `groups·16` rows.
                        unsafe { accumulate(&split_g, n, pair, first, rows, hi, lo, sums) };
                    }
                }
            }
            // SAFETY: returns the tile state this thread configured.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
            sums
        })
        .collect();
    for (row, out_row) in out.chunks_exact_mut(k).enumerate() {
        for (tile, columns) in out_row.chunks_exact_mut(TASK_COLUMNS).enumerate() {
            let at = tile * tile_sums + row * TASK_COLUMNS;
            for (c, value) in columns.iter_mut().enumerate() {
                *value = sums.iter().map(|part| part[at + c]).sum();
            }
        }
    }
}

/// Rows of `W` packed at a time by [`gradient`] for `k` columns: a chunk of about 256 KB, so
/// it stays in L2 while every column tile is packed from it.
fn chunk_rows(k: usize) -> usize {
    ((1 << 16) / k).next_multiple_of(STEP).clamp(STEP, 512)
}

/// Rows `rows` of `w` (`k` columns), columns `first_column..+32`, packed as `tdpbf16ps`'s
/// second operand: per step of 32 rows and tile of 16 columns, 16 lines of 64 bytes, line `p`
/// holding rows `2p` and `2p + 1` of each column in turn; `hi` gets the rounded values and
/// `lo` what they leave.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_columns(
    w: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    first_column: usize,
    hi: &mut [u16],
    lo: &mut [u16],
) {
    // Lane 2j takes column j of the first row, lane 2j + 1 column j of the second.
    let pairs: [u16; 32] = std::array::from_fn(|lane| (lane / 2 + 16 * (lane % 2)) as u16);
    let pairs = _mm512_loadu_si512(pairs.as_ptr() as *const _);
    let steps = rows.len() / STEP;
    assert!(hi.len() >= steps * 2 * TILE * STEP && lo.len() == hi.len(), "packs too small");
    for step in 0..steps {
        for tile in 0..2 {
            for line in 0..TILE {
                let row = rows.start + step * STEP + 2 * line;
                let column = first_column + TILE * tile;
                let first = _mm512_loadu_ps(w.as_ptr().add(row * k + column));
                let second = _mm512_loadu_ps(w.as_ptr().add((row + 1) * k + column));
                let ((hi_a, lo_a), (hi_b, lo_b)) = (split16(first), split16(second));
                let at = ((step * 2 + tile) * TILE + line) * STEP;
                let interleave = |a: __m256i, b: __m256i| {
                    _mm512_permutexvar_epi16(pairs, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b))
                };
                _mm512_storeu_si512(hi.as_mut_ptr().add(at) as *mut _, interleave(hi_a, hi_b));
                _mm512_storeu_si512(lo.as_mut_ptr().add(at) as *mut _, interleave(lo_a, lo_b));
            }
        }
    }
}

/// Adds to `sums` (rows of 32) the products of the split gradient's rows of groups `pair` and
/// `pair + 1` with the packed rows `first..first + rows`: `hi·hi`, `hi·lo`, then `lo·hi`.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
unsafe fn accumulate(
    split_g: &[u16],
    n: usize,
    pair: usize,
    first: usize,
    rows: usize,
    hi: &[u16],
    lo: &[u16],
    sums: &mut [f32],
) {
    let (g_stride, sum_stride) = (2 * 3 * n, 4 * TASK_COLUMNS);
    let base = sums.as_mut_ptr();
    let sum_at = |group: usize, tile: usize| base.add(group * TILE * TASK_COLUMNS + tile * TILE);
    let (s0, s1, s2, s3) = (sum_at(pair, 0), sum_at(pair, 1), sum_at(pair + 1, 0), sum_at(pair + 1, 1));
    asm!(
        "tileloadd tmm0, [{s0} + {stride}*1]",
        "tileloadd tmm1, [{s1} + {stride}*1]",
        "tileloadd tmm2, [{s2} + {stride}*1]",
        "tileloadd tmm3, [{s3} + {stride}*1]",
        s0 = in(reg) s0, s1 = in(reg) s1, s2 = in(reg) s2, s3 = in(reg) s3,
        stride = in(reg) sum_stride,
        options(nostack, readonly),
    );
    // (which third of the gradient's columns, which pack)
    for (third, pack) in [(0, hi), (1, lo), (2, hi)] {
        for step in 0..rows / STEP {
            let column = third * n + first + step * STEP;
            let (g0, g1) = (
                split_g.as_ptr().add(pair * TILE * 3 * n + column),
                split_g.as_ptr().add((pair + 1) * TILE * 3 * n + column),
            );
            let (w0, w1) =
                (pack.as_ptr().add(2 * step * TILE * STEP), pack.as_ptr().add((2 * step + 1) * TILE * STEP));
            asm!(
                "tileloadd tmm4, [{g0} + {g_stride}*1]",
                "tileloadd tmm5, [{g1} + {g_stride}*1]",
                "tileloadd tmm6, [{w0} + {line}*1]",
                "tileloadd tmm7, [{w1} + {line}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                g0 = in(reg) g0, g1 = in(reg) g1, w0 = in(reg) w0, w1 = in(reg) w1,
                g_stride = in(reg) g_stride,
                line = in(reg) 2 * STEP,
                options(nostack, readonly),
            );
        }
    }
    asm!(
        "tilestored [{s0} + {stride}*1], tmm0",
        "tilestored [{s1} + {stride}*1], tmm1",
        "tilestored [{s2} + {stride}*1], tmm2",
        "tilestored [{s3} + {stride}*1], tmm3",
        s0 = in(reg) s0, s1 = in(reg) s1, s2 = in(reg) s2, s3 = in(reg) s3,
        stride = in(reg) sum_stride,
        options(nostack),
    );
}
