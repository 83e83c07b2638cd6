//! Frozen weights split for f32-accurate products on AMX's bf16 tiles: each value becomes a
//! bf16 `hi` (its rounding) and a bf16 `lo` (the rounding of what `hi` leaves), 16 of f32's 24
//! significant bits between them. A product `x·w` is then `hi·hi + lo·hi + hi·lo` with `x`
//! split the same way (oneDNN's "bf16x3"); see [`super::x86_amx_split`] for the kernels.
//!
//! The weights are split once, where they load, rather than on every product: a split matrix
//! takes the bytes of the f32 one (two bf16 per value), and a weight whose values are all bf16
//! already (a bf16 checkpoint) keeps only `hi`, half of that, and its products take two bf16
//! passes instead of three.

use std::sync::Arc;

use rayon::prelude::*;

/// A `[rows, cols]` weight as bf16 parts, row after row: `[hi | lo]`, or `[hi]` where no value
/// leaves a remainder.
#[derive(Clone)]
pub struct SplitMatrix {
    parts: Arc<[u16]>,
    rows: usize,
    cols: usize,
    with_lo: bool,
}

impl std::fmt::Debug for SplitMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SplitMatrix({}x{}, lo: {})", self.rows, self.cols, self.with_lo)
    }
}

/// `value` as `(hi, lo)` bf16 bits: `hi` rounds it, `lo` rounds what `hi` leaves.
pub(super) fn split(value: f32) -> (u16, u16) {
    let hi = half::bf16::from_f32(value);
    (hi.to_bits(), half::bf16::from_f32(value - hi.to_f32()).to_bits())
}

/// Whether `bits` is a bf16 zero (either sign).
fn is_zero(bits: u16) -> bool {
    bits & 0x7fff == 0
}

impl SplitMatrix {
    /// The row-major `values` (`[rows, cols]`) split, or `None` where this CPU has no AMX or
    /// the shape is not whole tiles (32 rows and 32 columns at a time), and the products of
    /// [`split_product`] would not run.
    pub fn new(values: &[f32], (rows, cols): (usize, usize)) -> Option<Self> {
        if values.len() != rows * cols {
            return None;
        }
        Self::from_rows((rows, cols), |row, out| out.copy_from_slice(&values[row * cols..(row + 1) * cols]))
    }

    /// As [`Self::new`], each row's values written by `row_values(row, out)`: weights decoded
    /// a row at a time, with no f32 copy of the whole.
    pub fn from_rows(
        (rows, cols): (usize, usize),
        row_values: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Option<Self> {
        if !usable(rows, cols) {
            return None;
        }
        let mut parts = vec![0u16; 2 * rows * cols];
        parts.par_chunks_exact_mut(2 * cols).enumerate().for_each_init(
            || vec![0f32; cols],
            |values, (row, parts)| {
                row_values(row, values);
                let (hi, lo) = parts.split_at_mut(cols);
                for ((hi, lo), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(values.iter()) {
                    (*hi, *lo) = split(v);
                }
            },
        );
        let with_lo = parts.par_chunks_exact(2 * cols).any(|row| !row[cols..].iter().all(|&b| is_zero(b)));
        let parts: Arc<[u16]> = if with_lo {
            parts.into()
        } else {
            parts.chunks_exact(2 * cols).flat_map(|row| &row[..cols]).copied().collect()
        };
        Some(Self { parts, rows, cols, with_lo })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the values needed a `lo` part (else they are bf16 values, held as `hi` alone).
    pub fn with_lo(&self) -> bool {
        self.with_lo
    }

    /// bf16 values per stored row: `cols` for each part.
    pub(super) fn row_len(&self) -> usize {
        if self.with_lo {
            2 * self.cols
        } else {
            self.cols
        }
    }

    /// The parts, row after row.
    pub(super) fn data(&self) -> &[u16] {
        &self.parts
    }
}

/// Whether [`SplitMatrix::new`] takes a `[rows, cols]` weight on this CPU.
fn usable(rows: usize, cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::x86_amx_split::fits(rows, cols) && super::Isa::detect() == super::Isa::Amx
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, cols);
        false
    }
}

/// How a weight `W` (`[n, k]`) meets rows in [`split_product`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// `x · Wᵀ`: rows of `k` in, rows of `n` out (a layer's product).
    Transposed,
    /// `g · W`: rows of `n` in, rows of `k` out (the gradient for that product's input).
    AsStored,
}

impl Orientation {
    /// The widths of the rows in and out of a product with a `[n, k]` weight.
    pub fn widths(self, (n, k): (usize, usize)) -> (usize, usize) {
        match self {
            Orientation::Transposed => (k, n),
            Orientation::AsStored => (n, k),
        }
    }
}

/// The product of `x`'s rows with the split weight `w` in `orientation`, into `out`, on AMX
/// (about 2⁻¹⁶ of each `|x·w|` lost; see [`super::x86_amx_split`]). `false`, with nothing
/// written, where the lengths of `x` and `out` do not fit the weight.
pub fn split_product(x: &[f32], w: &SplitMatrix, orientation: Orientation, out: &mut [f32]) -> bool {
    let (inner, outer) = orientation.widths((w.rows, w.cols));
    let rows = x.len() / inner;
    if x.is_empty() || x.len() != rows * inner || out.len() != rows * outer {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a split matrix exists only where AMX is usable and the shape is whole tiles
        // (`usable`); the lengths were checked above.
        unsafe {
            match orientation {
                Orientation::Transposed => super::x86_amx_split::linear(x, w, out),
                Orientation::AsStored => super::x86_amx_split::gradient(x, w, out),
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // No split matrix is made off x86-64 (`usable`).
        let _ = (w, orientation, out);
        false
    }
}
