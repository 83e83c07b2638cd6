//! Training and evaluation examples as they cross the ring (exo classic's `SendExample`): a
//! batch of token sequences, right-padded, with their next-token targets and lengths; and what
//! comes back, the batch's loss.

use candle_core::{DType as CandleDType, Device};

use crate::error::{Error, Result};
use crate::tensor::WireTensor;

/// One batch of an example as classic sends it: `input` is token ids `[batch, seq]` for the
/// first shard and hidden states `[batch, seq, hidden]` after it; `target` the next token of
/// each position `[batch, seq]`; `lengths` each sequence's token count `[batch]` before
/// padding (the inputs are its first `length - 1` tokens, so `length - 1` positions count).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids or hidden states.
    pub input: WireTensor,
    /// Next-token ids, `[batch, seq]`.
    pub target: WireTensor,
    /// Tokens per sequence, `[batch]`.
    pub lengths: WireTensor,
}

impl Example {
    /// The example with its input replaced (the hidden states a shard passes on).
    pub fn with_input(&self, input: WireTensor) -> Self {
        Self { input, target: self.target.clone(), lengths: self.lengths.clone() }
    }

    /// Target ids, one row per sequence.
    pub fn targets(&self) -> Result<Vec<Vec<u32>>> {
        let tensor = self.target.to_candle(&Device::Cpu)?;
        let (batch, seq) = tensor.dims2().map_err(|_| {
            Error::InvalidTensor(format!("targets must be [batch, seq], got {:?}", tensor.dims()))
        })?;
        let values: Vec<i64> = tensor.to_dtype(CandleDType::I64)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = values.iter().find(|&&v| v < 0 || v > i64::from(u32::MAX)) {
            return Err(Error::InvalidTensor(format!("target id {bad} is not a token id")));
        }
        Ok((0..batch).map(|b| values[b * seq..(b + 1) * seq].iter().map(|&v| v as u32).collect()).collect())
    }

    /// Token count of each sequence.
    pub fn lengths(&self) -> Result<Vec<usize>> {
        let tensor = self.lengths.to_candle(&Device::Cpu)?;
        let values: Vec<i64> = tensor.to_dtype(CandleDType::I64)?.flatten_all()?.to_vec1()?;
        values
            .into_iter()
            .map(|v| usize::try_from(v).map_err(|_| Error::InvalidTensor(format!("negative length {v}"))))
            .collect()
    }
}

/// What a shard answers for an example: the batch's mean loss over the positions that count,
/// and, when training, the gradient of that loss with respect to the shard's input.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleLoss {
    /// Mean cross entropy over the batch's counted positions.
    pub loss: f32,
    /// Gradient with respect to the input hidden states, `[batch, seq, hidden]`.
    pub grads: Option<WireTensor>,
}

/// What a shard's layers make of an example: hidden states for the next shard, or on the last
/// shard the loss.
#[derive(Debug, Clone, PartialEq)]
pub enum ExampleOutput {
    /// Hidden states `[batch, seq, hidden]` for the next shard.
    Hidden(WireTensor),
    /// The loss, computed on the last shard.
    Loss(ExampleLoss),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn ints(dtype: DType, shape: Vec<usize>, values: &[i32]) -> WireTensor {
        WireTensor::new(dtype, shape, bytemuck::cast_slice(values).to_vec()).unwrap()
    }

    #[test]
    fn targets_and_lengths_read_classic_int32_arrays() {
        let example = Example {
            input: ints(DType::I32, vec![2, 2], &[1, 2, 3, 0]),
            target: ints(DType::I32, vec![2, 2], &[2, 5, 4, 0]),
            lengths: ints(DType::I32, vec![2], &[3, 2]),
        };
        assert_eq!(example.targets().unwrap(), vec![vec![2, 5], vec![4, 0]]);
        assert_eq!(example.lengths().unwrap(), vec![3, 2]);
        let bad = Example { lengths: ints(DType::I32, vec![1], &[-1]), ..example };
        assert!(bad.lengths().unwrap_err().to_string().contains("negative length -1"));
    }
}
