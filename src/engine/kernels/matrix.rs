//! Stored weight matrices: their element types and the bytes they are read from.

use std::ops::Range;
use std::sync::Arc;

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

    /// The matrix's bytes, row after row.
    pub(super) fn data(&self) -> &[u8] {
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
pub(super) fn element(bytes: &[u8], i: usize, dtype: WeightDType) -> f32 {
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
