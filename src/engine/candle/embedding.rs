//! The token embedding table: rows looked up by token id, in the checkpoint's dtype or in
//! quantized blocks (a GGUF's `token_embd`, an MLX checkpoint's `embed_tokens`, which a tied
//! LM head then shares).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::engine::kernels::{
    dequantize_affine_row, dequantize_row, AffineMatrix, BlockMatrix, WeightMatrix,
};
use crate::error::Result;

/// `[vocab, hidden]` embeddings.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// Rows in f32, bf16 or f16, read in place (or streamed whole as a tied head).
    Dense(WeightMatrix),
    /// Rows in a block format the host kernels read, decoded when looked up.
    Blocks(BlockMatrix),
    /// Rows of MLX's affine codes, decoded when looked up.
    Affine(AffineMatrix),
    /// Rows in another block format (or on an accelerator), decoded by candle.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// The rows of `ids` (each below the vocabulary size) as f32 `[ids.len(), hidden]`, on
    /// the table's device (the host for dense rows).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(table) => host_rows(ids, table.cols(), |id, row| table.row_f32(id, row)),
            Self::Blocks(table) => host_rows(ids, table.cols(), |id, row| dequantize_row(table, id, row)),
            Self::Affine(table) => {
                host_rows(ids, table.cols(), |id, row| dequantize_affine_row(table, id, row))
            }
            Self::Quantized(table) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                Ok(table.embedding(&ids)?)
            }
        }
    }
}

/// The rows of `ids`, each `hidden` values that `decode` writes, as f32 `[ids.len(), hidden]`
/// on the host.
fn host_rows(ids: &[u32], hidden: usize, decode: impl Fn(usize, &mut [f32])) -> Result<Tensor> {
    let mut rows = vec![0.0f32; ids.len() * hidden];
    for (&id, row) in ids.iter().zip(rows.chunks_exact_mut(hidden)) {
        decode(id as usize, row);
    }
    Ok(Tensor::from_vec(rows, (ids.len(), hidden), &Device::Cpu)?)
}
