//! The tensor wire codec: dtype names, shapes and byte lengths that disagree, shapes that
//! overflow, and float bytes full of NaN and infinities; then what a node does with a tensor
//! it accepted (the candle conversion and sampling from it as logits).

use candle_core::Device;
use proptest::prelude::*;

use super::assert_clear;
use crate::engine::sampling::sample_token;
use crate::engine::SamplingParams;
use crate::tensor::WireTensor;
use crate::{proto, Error};

const DTYPES: [&str; 9] =
    ["uint8", "uint32", "int16", "int32", "int64", "bfloat16", "float16", "float32", "float64"];

fn dtype_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(DTYPES.to_vec()).prop_map(str::to_string),
        1 => ".{0,10}",
        1 => Just("complex64".to_string()),
    ]
}

fn dimension() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0i32..6, 1 => any::<i32>(), 1 => Just(i32::MAX), 1 => -3i32..0]
}

/// Bytes rich in float specials: NaN (quiet and signalling), ±infinity, -0 and subnormals.
fn float_bytes(len: usize) -> impl Strategy<Value = Vec<u8>> {
    let special = prop_oneof![
        Just([0x00u8, 0x00, 0xc0, 0x7f]),
        Just([0x01, 0x00, 0x80, 0x7f]),
        Just([0x00, 0x00, 0x80, 0x7f]),
        Just([0x00, 0x00, 0x80, 0xff]),
        Just([0x00, 0x00, 0x00, 0x80]),
        Just([0x01, 0x00, 0x00, 0x00]),
        any::<[u8; 4]>(),
    ];
    prop::collection::vec(special, len.div_ceil(4)).prop_map(move |words| {
        let mut bytes: Vec<u8> = words.concat();
        bytes.truncate(len);
        bytes
    })
}

/// A protobuf tensor whose bytes match its shape most of the time, and are off by a few
/// bytes otherwise.
pub(super) fn proto_tensor() -> BoxedStrategy<proto::Tensor> {
    (dtype_name(), prop::collection::vec(dimension(), 0..5), -2i64..3, any::<bool>())
        .prop_flat_map(|(dtype, shape, skew, exact)| {
            let width = DTYPES.iter().position(|d| *d == dtype).map_or(1, |i| [1, 4, 2, 4, 8, 2, 2, 4, 8][i]);
            let elements: i64 = shape
                .iter()
                .try_fold(1i64, |acc, &d| acc.checked_mul(i64::from(d.max(0))))
                .unwrap_or(i64::MAX);
            let fitting = elements.saturating_mul(width).saturating_add(if exact { 0 } else { skew });
            let len = usize::try_from(fitting.clamp(0, 4096)).unwrap_or(0);
            float_bytes(len).prop_map(move |tensor_data| proto::Tensor {
                tensor_data,
                shape: shape.clone(),
                dtype: dtype.clone(),
            })
        })
        .boxed()
}

proptest! {
    #[test]
    fn fuzz_wire_tensor(message in proto_tensor(), temperature in prop_oneof![Just(0.0f32), 0.0f32..2.0, Just(f32::NAN)]) {
        let wire = match WireTensor::from_proto(message.clone()) {
            Ok(wire) => wire,
            Err(error) => {
                prop_assert!(matches!(error, Error::InvalidTensor(_)), "{error}");
                return assert_clear(&error);
            }
        };
        let elements: usize = wire.shape().iter().product();
        prop_assert_eq!(wire.data().len(), elements * wire.dtype().size_in_bytes());
        // Accepted tensors survive candle bit for bit, NaN payloads included.
        let tensor = wire.to_candle(&Device::Cpu)?;
        prop_assert_eq!(&WireTensor::from_candle(&tensor)?, &wire);
        prop_assert_eq!(wire.clone().into_proto()?, message);
        // Any accepted tensor may arrive as logits: sampling from it answers or refuses.
        if let Ok(values) = tensor.to_dtype(candle_core::DType::F32).and_then(|t| t.flatten_all()?.to_vec1::<f32>()) {
            let params = SamplingParams { temperature, top_p: 0.9, top_k: 3, seed: Some(1) };
            match sample_token(&values, params) {
                Ok(token) => prop_assert!((token as usize) < values.len().max(1)),
                Err(error) => assert_clear(&error)?,
            }
        }
    }
}
