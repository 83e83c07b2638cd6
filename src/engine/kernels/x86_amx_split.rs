//! f32 products on AMX tiles, for the frozen weights of fine-tuning, with weights split to bf16
//! `hi` and `lo` parts where they load ([`super::split`]) and inputs split on each call: a
//! product `x·w` is `hi·hi + lo·hi + hi·lo`, three bf16 tile products summed in f32, or two
//! where the weight has no `lo` (bf16 values). What is dropped (`lo·lo` and each split's
//! remainder) is about 2⁻¹⁶ of `|x·w|`, where rounding to one bf16 would lose 2⁻⁹; the tests
//! hold both kernels to `Σ|x·w|·2⁻¹⁵` of the f64 product.
//!
//! Two orientations, for a layer's forward product and its input's gradient:
//! - [`linear`]: `out = x · Wᵀ`. The weight's stored rows are the first operand of
//!   [`super::x86_amx`]'s bf16 kernel, loaded in place; the input's `hi` and `lo`, packed as
//!   its second operand, meet them in runs over the columns of each part.
//! - [`gradient`]: `out = g · W`. Here the sum runs over `W`'s rows, so `W` is the second
//!   operand of `tdpbf16ps`, whose lines pair two consecutive rows: each task packs 32 of
//!   `W`'s columns, a chunk of rows at a time, into tiles of each part, and the gradient's
//!   rows, split to `hi` and `lo`, are the first operand, loaded in place.

use std::arch::asm;
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::split::{split, SplitMatrix};
use super::x86_amx::{for_each_task_of_runs, PackedInput, Run, TileConfig, STEP, TILE};

/// Output columns packed and summed together in [`gradient`]: two tiles.
const TASK_COLUMNS: usize = 2 * TILE;

/// Whether `[n, k]` f32 weights take these kernels: whole tiles both ways.
pub fn fits(n: usize, k: usize) -> bool {
    n.is_multiple_of(STEP) && k.is_multiple_of(STEP) && n > 0 && k > 0
}

/// Rows of `k` values split into their `hi` and their `lo` rows, as f32 values that bf16 holds
/// exactly (so rounding them to bf16 again changes nothing).
fn split_rows(x: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let widen = |bits: u16| half::bf16::from_bits(bits).to_f32();
    let (mut hi, mut lo) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    let rows = hi.par_chunks_exact_mut(k).zip(lo.par_chunks_exact_mut(k));
    rows.zip(x.par_chunks_exact(k)).for_each(|((hi, lo), values)| {
        for ((hi, lo), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(values) {
            let (h, l) = split(v);
            (*hi, *lo) = (widen(h), widen(l));
        }
    });
    (hi, lo)
}

/// `out[m, n] = x[m, k] · Wᵀ` for the split `w` (`[n, k]`). The caller checked the slices'
/// lengths; `w` exists only where AMX is usable.
pub unsafe fn linear(x: &[f32], w: &SplitMatrix, out: &mut [f32]) {
    let (k, row_len) = (w.cols(), w.row_len());
    let (hi, lo) = split_rows(x, k);
    let (hi, lo) = (PackedInput::new(&hi, k), PackedInput::new(&lo, k));
    // `W`'s `hi` meets the input's `hi` and `lo`, then `W`'s `lo` (2k bytes into each row) its `hi`.
    let mut runs = vec![Run { offset: 0, input: &hi }, Run { offset: 0, input: &lo }];
    if w.with_lo() {
        runs.push(Run { offset: 2 * k, input: &hi });
    }
    let data = w.data();
    for_each_task_of_runs(&runs, true, w.rows(), 2 * row_len, None, out, |task, _| {
        data[task * 2 * TILE * row_len..].as_ptr() as *const u8
    });
}

/// `out[m, k] = g[m, n] · W` for the split `w` (`[n, k]`). The caller checked the slices'
/// lengths; `w` exists only where AMX is usable.
///
/// `W` is packed a chunk of consecutive rows at a time, each row read from start to end (a
/// column tile at a time down all of the LM head's rows left every read a miss, a third of a
/// training step; blocks of 256 columns down a chunk of rows ran at half the speed of whole
/// rows), and each thread sums its run of chunks' share of every output into a buffer of its
/// own, added up at the end.
pub unsafe fn gradient(g: &[f32], w: &SplitMatrix, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    let m = g.len() / n;
    let split_g = SplitRows::new(g, n);
    let chunk_rows = chunk_rows(k);
    let chunks = n.div_ceil(chunk_rows);
    let parts = rayon::current_num_threads().clamp(1, chunks);
    let weight_parts = w.row_len() / k;
    // Asking for the next chunk while this one multiplies pays where both fit L2 beside the
    // sums: one thread, 64 rows, f32 weights `[8192, 2048]` went from 55-57 to 57-62 G
    // multiply-adds a second, but `[2048, 8192]` (chunks of 1 MB) from 37-39 to 25-31.
    let prefetch = chunk_rows * k <= 1 << 16;
    // Per part: for each column tile, its sums as rows of 32 (`groups·16` of them).
    let tile_sums = split_g.padded_rows * TASK_COLUMNS;
    let sums: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut sums = vec![0f32; k / TASK_COLUMNS * tile_sums];
            let mut packs = vec![0u16; weight_parts * chunk_rows * k];
            let config = TileConfig::uniform();
            // SAFETY: the caller checked AMX; the configuration is loaded before any tile is used.
            unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
            let part_chunks = part * chunks / parts..(part + 1) * chunks / parts;
            for chunk in part_chunks.clone() {
                let first = chunk * chunk_rows;
                let rows = chunk_rows.min(n - first);
                // SAFETY: AVX-512 BF16 comes with AMX; rows `first..first + rows` lie inside
                // `w` and each part's pack holds `chunk_rows·k` values.
                unsafe { pack_rows(w, first..first + rows, &mut packs, chunk_rows * k) };
                let (hi, lo) = packs.split_at(chunk_rows * k);
                let next = if prefetch && chunk + 1 < part_chunks.end {
                    (first + rows)..(first + rows + chunk_rows).min(n)
                } else {
                    0..0
                };
                for (tile, sums) in sums.chunks_exact_mut(tile_sums).enumerate() {
                    prefetch_columns(w, next.clone(), tile * TASK_COLUMNS);
                    let block = tile * rows * TASK_COLUMNS;
                    // `g`'s `hi` and `lo` meet `W`'s `hi`, then `g`'s `hi` meets `W`'s `lo`.
                    let passes =
                        [(HI, &hi[block..]), (LO, &hi[block..]), (HI, lo.get(block..).unwrap_or_default())];
                    let passes = &passes[..if weight_parts == 2 { 3 } else { 2 }];
                    for pair in (0..split_g.padded_rows / TILE).step_by(2) {
                        // SAFETY: the split rows hold steps `first / 32..` of groups `pair`,
                        // `pair + 1`, the packs `rows / 32` steps of two tiles from `tile`'s
                        // block, and `sums` every padded row.
                        unsafe { accumulate(&split_g, pair, first, rows, passes, sums) };
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

/// Rows of `W` packed at a time by [`gradient`] for `k` columns: about 128 KB of each part,
/// whose packs stay in L2 while every column tile meets them.
fn chunk_rows(k: usize) -> usize {
    ((1 << 16) / k).next_multiple_of(STEP).clamp(STEP, 512)
}

/// Asks for the line of columns `column..column + 32` of each part of `w`'s rows `rows` into
/// L2: [`gradient`] asks for the next chunk's while it multiplies this one's, so that packing
/// it reads cache instead of waiting on memory.
fn prefetch_columns(w: &SplitMatrix, rows: std::ops::Range<usize>, column: usize) {
    let (data, k, row_len) = (w.data().as_ptr(), w.cols(), w.row_len());
    for row in rows {
        for part in (0..row_len).step_by(k) {
            // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(data.wrapping_add(row * row_len + part + column) as *const i8)
            };
        }
    }
}

/// The split rows' `hi` half.
const HI: usize = 0;
/// The split rows' `lo` half.
const LO: usize = 1;

/// Rows of `n` values split to `hi` and `lo` and laid out as `tdpbf16ps`'s first operand tile
/// by tile: for each half and step of 32 columns, every row's 32 values in turn (rows padded
/// with zeros to pairs of tiles), so a tile is 1 KB in one place.
struct SplitRows {
    values: Vec<u16>,
    padded_rows: usize,
    steps: usize,
}

impl SplitRows {
    fn new(g: &[f32], n: usize) -> Self {
        let padded_rows = (g.len() / n).div_ceil(TILE).next_multiple_of(2) * TILE;
        let steps = n / STEP;
        let mut values = vec![0u16; 2 * steps * padded_rows * STEP];
        let (hi, lo) = values.split_at_mut(steps * padded_rows * STEP);
        let blocks =
            hi.par_chunks_exact_mut(padded_rows * STEP).zip(lo.par_chunks_exact_mut(padded_rows * STEP));
        blocks.enumerate().for_each(|(step, (hi, lo))| {
            for (row, values) in g.chunks_exact(n).enumerate() {
                for (c, &v) in values[step * STEP..(step + 1) * STEP].iter().enumerate() {
                    (hi[row * STEP + c], lo[row * STEP + c]) = split(v);
                }
            }
        });
        Self { values, padded_rows, steps }
    }

    /// The tile of `half` ([`HI`] or [`LO`]), step `step`, rows of `group`.
    fn tile(&self, half: usize, step: usize, group: usize) -> *const u16 {
        self.values[((half * self.steps + step) * self.padded_rows + group * TILE) * STEP..].as_ptr()
    }
}

/// Rows `rows` of `w`'s parts packed as `tdpbf16ps`'s second operand into `packs` (one part
/// every `part_len` values), each 32 columns in a block of their own (`rows·32` values): per
/// step of 32 rows and tile of 16 columns, 16 lines of 64 bytes, line `p` holding rows `2p`
/// and `2p + 1` of each column in turn. Each row is read from start to end.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows(w: &SplitMatrix, rows: std::ops::Range<usize>, packs: &mut [u16], part_len: usize) {
    // Lane 2j takes column j of the first row, lane 2j + 1 column j of the second.
    let pairs: [u16; 32] = std::array::from_fn(|lane| (lane / 2 + 16 * (lane % 2)) as u16);
    let pairs = _mm512_loadu_si512(pairs.as_ptr() as *const _);
    let (k, row_len, count) = (w.cols(), w.row_len(), rows.len());
    let data = w.data();
    assert!(
        count * k <= part_len && packs.len() >= row_len / k * part_len && rows.end * row_len <= data.len(),
        "packs too small"
    );
    for part in 0..row_len / k {
        let pack = packs.as_mut_ptr().add(part * part_len);
        for pair in (0..count).step_by(2) {
            let (step, line) = (pair / STEP, pair % STEP / 2);
            let first = data.as_ptr().add((rows.start + pair) * row_len + part * k);
            let second = first.add(row_len);
            for column in (0..k).step_by(TILE) {
                let (block, tile) = (column / TASK_COLUMNS, column % TASK_COLUMNS / TILE);
                let a = _mm256_loadu_si256(first.add(column) as *const __m256i);
                let b = _mm256_loadu_si256(second.add(column) as *const __m256i);
                let both =
                    _mm512_permutexvar_epi16(pairs, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b));
                let at = block * count * TASK_COLUMNS + ((step * 2 + tile) * TILE + line) * STEP;
                _mm512_storeu_si512(pack.add(at) as *mut _, both);
            }
        }
    }
}

/// Adds to `sums` (rows of 32) the products of the split rows of groups `pair` and `pair + 1`
/// with `W`'s packed rows `first..first + rows`: for each pass, the rows' half ([`HI`] or
/// [`LO`]) and the pack of one of `W`'s parts.
#[inline(never)]
unsafe fn accumulate(
    split_g: &SplitRows,
    pair: usize,
    first: usize,
    rows: usize,
    passes: &[(usize, &[u16])],
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
    for &(half, pack) in passes {
        for step in 0..rows / STEP {
            let column_step = first / STEP + step;
            let (g0, g1) = (split_g.tile(half, column_step, pair), split_g.tile(half, column_step, pair + 1));
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
