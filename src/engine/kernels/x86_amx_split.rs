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
    out.par_chunks_exact_mut(3 * k).zip(x.par_chunks_exact(k)).for_each(|(row, values)| {
        for (c, &v) in values.iter().enumerate() {
            let (hi, lo) = split(v);
            (row[c], row[k + c], row[2 * k + c]) = (widen(hi), widen(hi), widen(lo));
        }
    });
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
/// `W` is packed a chunk of consecutive rows at a time, each row read from start to end (a
/// column tile at a time down all of the LM head's rows left every read a miss, a third of a
/// training step), and each thread sums its run of chunks' share of every output into a
/// buffer of its own, added up at the end.
pub unsafe fn gradient(g: &[f32], w: &[f32], (n, k): (usize, usize), out: &mut [f32]) {
    let m = g.len() / n;
    let split_g = SplitRows::new(g, n);
    let chunk_rows = chunk_rows(k);
    let chunks = n.div_ceil(chunk_rows);
    let parts = rayon::current_num_threads().clamp(1, chunks);
    // Per part: for each column tile, its sums as rows of 32 (`groups·16` of them).
    let tile_sums = split_g.padded_rows * TASK_COLUMNS;
    let sums: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut sums = vec![0f32; k / TASK_COLUMNS * tile_sums];
            let mut packed = vec![0u16; 2 * chunk_rows * k];
            let (hi, lo) = packed.split_at_mut(chunk_rows * k);
            let config = TileConfig::uniform();
            // SAFETY: the caller checked AMX; the configuration is loaded before any tile is used.
            unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
            for chunk in part * chunks / parts..(part + 1) * chunks / parts {
                let first = chunk * chunk_rows;
                let rows = chunk_rows.min(n - first);
                // SAFETY: AVX-512 BF16 comes with AMX; rows `first..first + rows` lie inside
                // `w` and each pack holds `rows·k` values.
                unsafe { pack_rows(w, k, first..first + rows, hi, lo) };
                for (tile, sums) in sums.chunks_exact_mut(tile_sums).enumerate() {
                    let packs = (&hi[tile * rows * TASK_COLUMNS..], &lo[tile * rows * TASK_COLUMNS..]);
                    for pair in (0..split_g.padded_rows / TILE).step_by(2) {
                        // SAFETY: the split rows hold steps `first / 32..` of groups `pair`,
                        // `pair + 1`, the packs `rows / 32` steps of two tiles from `tile`'s
                        // block, and `sums` every padded row.
                        unsafe { accumulate(&split_g, pair, first, rows, packs, sums) };
                    }
                }
            }
            // SAFETY: returns the tile state this thread configured.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
            sums
        })
        .collect();
    for (row, out_row) in out.chunks_exact_mut(k).enumerate().take(m) {
        for (tile, columns) in out_row.chunks_exact_mut(TASK_COLUMNS).enumerate() {
            let at = tile * tile_sums + row * TASK_COLUMNS;
            for (c, value) in columns.iter_mut().enumerate() {
                *value = sums.iter().map(|part| part[at + c]).sum();
            }
        }
    }
}

/// Rows of `n` values split to `[hi | hi | lo]` and laid out as `tdpbf16ps`'s first operand
/// tile by tile: for each third and step of 32 columns, every row's 32 values in turn (rows
/// padded with zeros to pairs of tiles), so a tile is 1 KB in one place.
struct SplitRows {
    values: Vec<u16>,
    padded_rows: usize,
    steps: usize,
}

impl SplitRows {
    fn new(g: &[f32], n: usize) -> Self {
        let padded_rows = (g.len() / n).div_ceil(TILE).next_multiple_of(2) * TILE;
        let steps = n / STEP;
        let mut values = vec![0u16; 3 * steps * padded_rows * STEP];
        let third = steps * padded_rows * STEP;
        let (hi, rest) = values.split_at_mut(third);
        let (hi_again, lo) = rest.split_at_mut(third);
        let blocks = hi.par_chunks_exact_mut(padded_rows * STEP);
        let blocks = blocks.zip(hi_again.par_chunks_exact_mut(padded_rows * STEP));
        blocks.zip(lo.par_chunks_exact_mut(padded_rows * STEP)).enumerate().for_each(
            |(step, ((hi, hi_again), lo))| {
                for (row, values) in g.chunks_exact(n).enumerate() {
                    for (c, &v) in values[step * STEP..(step + 1) * STEP].iter().enumerate() {
                        let (h, l) = split(v);
                        (hi[row * STEP + c], hi_again[row * STEP + c], lo[row * STEP + c]) = (h, h, l);
                    }
                }
            },
        );
        Self { values, padded_rows, steps }
    }

    /// The tile of `third` (0, 1: `hi`; 2: `lo`), step `step`, rows of `group`.
    fn tile(&self, third: usize, step: usize, group: usize) -> *const u16 {
        self.values[((third * self.steps + step) * self.padded_rows + group * TILE) * STEP..].as_ptr()
    }
}

/// Rows of `W` packed at a time by [`gradient`] for `k` columns: about 256 KB of `W`, whose
/// packs stay in L2 while every column tile meets them.
fn chunk_rows(k: usize) -> usize {
    ((1 << 16) / k).next_multiple_of(STEP).clamp(STEP, 512)
}

/// Rows `rows` of `w` (`k` columns) packed as `tdpbf16ps`'s second operand, each 32 columns in
/// a block of their own (`rows·32` values): per step of 32 rows and tile of 16 columns, 16
/// lines of 64 bytes, line `p` holding rows `2p` and `2p + 1` of each column in turn. `hi`
/// gets the rounded values and `lo` what they leave. Each row is read from start to end.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows(w: &[f32], k: usize, rows: std::ops::Range<usize>, hi: &mut [u16], lo: &mut [u16]) {
    // Lane 2j takes column j of the first row, lane 2j + 1 column j of the second.
    let pairs: [u16; 32] = std::array::from_fn(|lane| (lane / 2 + 16 * (lane % 2)) as u16);
    let pairs = _mm512_loadu_si512(pairs.as_ptr() as *const _);
    let count = rows.len();
    assert!(hi.len() >= count * k && lo.len() >= count * k && rows.end * k <= w.len(), "packs too small");
    let interleave = |a: __m256i, b: __m256i| {
        _mm512_permutexvar_epi16(pairs, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b))
    };
    for pair in (0..count).step_by(2) {
        let (step, line) = (pair / STEP, pair % STEP / 2);
        let (first, second) =
            (w.as_ptr().add((rows.start + pair) * k), w.as_ptr().add((rows.start + pair + 1) * k));
        for column in (0..k).step_by(TILE) {
            let (block, tile) = (column / TASK_COLUMNS, column % TASK_COLUMNS / TILE);
            let ((hi_a, lo_a), (hi_b, lo_b)) =
                (split16(_mm512_loadu_ps(first.add(column))), split16(_mm512_loadu_ps(second.add(column))));
            let at = block * count * TASK_COLUMNS + ((step * 2 + tile) * TILE + line) * STEP;
            _mm512_storeu_si512(hi.as_mut_ptr().add(at) as *mut _, interleave(hi_a, hi_b));
            _mm512_storeu_si512(lo.as_mut_ptr().add(at) as *mut _, interleave(lo_a, lo_b));
        }
    }
}

/// Adds to `sums` (rows of 32) the products of the split rows of groups `pair` and `pair + 1`
/// with `W`'s packed rows `first..first + rows` (`packs`: `hi`, `lo`): `hi·hi`, `hi·lo`, then
/// `lo·hi`.
#[inline(never)]
unsafe fn accumulate(
    split_g: &SplitRows,
    pair: usize,
    first: usize,
    rows: usize,
    (hi, lo): (&[u16], &[u16]),
    sums: &mut [f32],
) {
    let sum_stride = 4 * TASK_COLUMNS;
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
    for (third, pack) in [(0, hi), (1, lo), (2, hi)] {
        for step in 0..rows / STEP {
            let column_step = first / STEP + step;
            let (g0, g1) =
                (split_g.tile(third, column_step, pair), split_g.tile(third, column_step, pair + 1));
            let (w0, w1) =
                (pack.as_ptr().add(2 * step * TILE * STEP), pack.as_ptr().add((2 * step + 1) * TILE * STEP));
            asm!(
                "tileloadd tmm4, [{g0} + {line}*1]",
                "tileloadd tmm5, [{g1} + {line}*1]",
                "tileloadd tmm6, [{w0} + {line}*1]",
                "tileloadd tmm7, [{w1} + {line}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                g0 = in(reg) g0, g1 = in(reg) g1, w0 = in(reg) w0, w1 = in(reg) w1,
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
