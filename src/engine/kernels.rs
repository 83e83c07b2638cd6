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
            Isa::Avx2 => return unsafe { x86::dot_rows_avx2(dtype, weights, inputs, k, dots) },
            Isa::Portable => {}
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

    use super::{element, WeightDType, ROW_BLOCK, WEIGHT_BLOCK};

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

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum8(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }

    /// AVX2 + FMA dot products: 16 elements per step, two accumulators per input row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2(
        dtype: WeightDType,
        weights: &[u8],
        inputs: &[f32],
        k: usize,
        dots: &mut [f32],
    ) {
        let rows = dots.len();
        let (w, x) = (weights.as_ptr(), inputs.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; ROW_BLOCK];
        let mut i = 0;
        while i + 16 <= k {
            let w0 = load8(dtype, w, i);
            let w1 = load8(dtype, w, i + 8);
            for (r, pair) in acc.iter_mut().enumerate().take(rows) {
                let xr = x.add(r * k + i);
                pair[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), pair[0]);
                pair[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), pair[1]);
            }
            i += 16;
        }
        for (r, (pair, out)) in acc.iter().zip(dots.iter_mut()).enumerate() {
            let mut dot = sum8(_mm256_add_ps(pair[0], pair[1]));
            for j in i..k {
                dot += element(weights, j, dtype) * inputs[r * k + j];
            }
            *out = dot;
        }
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
                for (m, n, k) in [(1, 7, 37), (3, 70, 64), (17, 65, 100), (130, 9, 48), (1, 130, 2048)] {
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
