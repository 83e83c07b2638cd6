//! A deterministic engine with exo classic's dummy semantics, for node and API tests:
//! every prompt encodes to `[1]`, the last shard adds 1 to its input, and sampling
//! returns the input token until it passes `num_generate_dummy_tokens`, then EOS.

use async_trait::async_trait;

use super::{Engine, InferenceState, SamplingParams};
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};

/// exo classic's `DummyInferenceEngine`.
#[derive(Debug)]
pub struct DummyEngine {
    /// Token that ends generation.
    pub eos_token_id: u32,
    /// Tokens above this value sample to EOS.
    pub num_generate_dummy_tokens: u32,
    shard: std::sync::Mutex<Option<Shard>>,
}

impl Default for DummyEngine {
    fn default() -> Self {
        Self { eos_token_id: 69, num_generate_dummy_tokens: 10, shard: std::sync::Mutex::new(None) }
    }
}

/// The values of an integer or float tensor, widened to i64.
fn integer_values(tensor: &WireTensor) -> Result<Vec<i64>> {
    let data = tensor.data();
    Ok(match tensor.dtype() {
        DType::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(data),
        DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(data).into_iter().map(i64::from).collect(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(data).into_iter().map(i64::from).collect(),
        DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(data).into_iter().map(|v| v as i64).collect(),
        DType::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(data).into_iter().map(|v| v as i64).collect(),
        other => {
            return Err(Error::InvalidTensor(format!(
                "the dummy engine takes integer tokens, not {}",
                other.name()
            )))
        }
    })
}

#[async_trait]
impl Engine for DummyEngine {
    fn name(&self) -> &str {
        "dummy"
    }

    fn current_shard(&self) -> Option<Shard> {
        self.shard.lock().expect("shard lock poisoned").clone()
    }

    async fn encode(&self, _shard: &Shard, _prompt: &str) -> Result<Vec<u32>> {
        Ok(vec![1])
    }

    async fn decode(&self, _shard: &Shard, tokens: &[u32]) -> Result<String> {
        Ok("dummy".repeat(tokens.len()))
    }

    async fn sample(&self, logits: &WireTensor, _params: SamplingParams) -> Result<Vec<u32>> {
        let values = integer_values(logits)?;
        let first = *values
            .first()
            .ok_or_else(|| Error::InvalidTensor("cannot sample from an empty tensor".into()))?;
        if first > i64::from(self.num_generate_dummy_tokens) {
            return Ok(vec![self.eos_token_id]);
        }
        u32::try_from(first)
            .map(|t| vec![t])
            .map_err(|_| Error::InvalidTensor(format!("token {first} is negative")))
    }

    async fn infer_tensor(
        &self,
        _request_id: &str,
        shard: &Shard,
        input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        self.ensure_shard(shard).await?;
        if !shard.is_last_layer() {
            return Ok((input, state));
        }
        let shape = input.shape().to_vec();
        let plus_one = integer_values(&input)?
            .into_iter()
            .map(|v| {
                v.checked_add(1).ok_or_else(|| Error::InvalidTensor(format!("value {v} has no successor")))
            })
            .collect::<Result<Vec<i64>>>()?;
        let output = WireTensor::new(DType::I64, shape, bytemuck::cast_slice(&plus_one).to_vec())?;
        Ok((output, state))
    }

    async fn ensure_shard(&self, shard: &Shard) -> Result<()> {
        *self.shard.lock().expect("shard lock poisoned") = Some(shard.clone());
        Ok(())
    }

    async fn finish_request(&self, _request_id: &str) {}

    async fn eos_token_ids(&self, _shard: &Shard) -> Result<Vec<u32>> {
        Ok(vec![self.eos_token_id])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(values: &[i64], shape: Vec<usize>) -> WireTensor {
        WireTensor::new(DType::I64, shape, bytemuck::cast_slice(values).to_vec()).unwrap()
    }

    #[tokio::test]
    async fn last_shard_adds_one_and_others_pass_through() {
        let engine = DummyEngine::default();
        let last = Shard::new("dummy", 0, 0, 1);
        let (out, _) = engine.infer_tensor("r", &last, tokens(&[1, 2, 3], vec![1, 3]), None).await.unwrap();
        assert_eq!(integer_values(&out).unwrap(), [2, 3, 4]);
        assert_eq!(out.shape(), &[1, 3]);
        let first = Shard::new("dummy", 0, 0, 2);
        let (out, _) = engine.infer_tensor("r", &first, tokens(&[5], vec![1, 1]), None).await.unwrap();
        assert_eq!(integer_values(&out).unwrap(), [5]);
        // Found by fuzz_rpc_messages: a peer's i64::MAX once overflowed the addition.
        let error = engine.infer_tensor("r", &last, tokens(&[i64::MAX], vec![1, 1]), None).await.unwrap_err();
        assert!(error.to_string().contains("has no successor"), "{error}");
    }

    #[tokio::test]
    async fn sampling_ends_with_eos_after_the_dummy_tokens() {
        let engine = DummyEngine::default();
        assert_eq!(engine.sample(&tokens(&[3], vec![1]), SamplingParams::default()).await.unwrap(), [3]);
        assert_eq!(engine.sample(&tokens(&[11], vec![1]), SamplingParams::default()).await.unwrap(), [69]);
        assert!(engine.sample(&tokens(&[], vec![0]), SamplingParams::default()).await.is_err());
    }
}
