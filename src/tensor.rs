//! Wire tensors: numpy's dtype name, a shape and little-endian bytes in C order,
//! as exo classic sends them; conversion to and from candle tensors.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::proto;

#[cfg(target_endian = "big")]
compile_error!(
    "wire tensors are little-endian and are reinterpreted in place; big-endian hosts are unsupported"
);

/// Element types that can cross the wire, named as numpy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    U8,
    U32,
    I16,
    I32,
    I64,
    BF16,
    F16,
    F32,
    F64,
}

impl DType {
    const ALL: [DType; 9] = [
        DType::U8,
        DType::U32,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::F64,
    ];

    /// numpy's name for the type (`bfloat16` is the ml_dtypes name numpy extensions use).
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The type named `name`, or an error listing the supported names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|d| d.name()).collect();
            Error::InvalidTensor(format!("unknown dtype {name:?} (supported: {})", known.join(", ")))
        })
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        self.to_candle().size_in_bytes()
    }

    /// The matching candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DType::U8 => candle_core::DType::U8,
            DType::U32 => candle_core::DType::U32,
            DType::I16 => candle_core::DType::I16,
            DType::I32 => candle_core::DType::I32,
            DType::I64 => candle_core::DType::I64,
            DType::BF16 => candle_core::DType::BF16,
            DType::F16 => candle_core::DType::F16,
            DType::F32 => candle_core::DType::F32,
            DType::F64 => candle_core::DType::F64,
        }
    }

    /// The wire type for a candle dtype, if it has one.
    pub fn from_candle(dtype: candle_core::DType) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.to_candle() == dtype)
            .ok_or_else(|| Error::InvalidTensor(format!("candle dtype {dtype:?} has no wire encoding")))
    }
}

/// A validated tensor as it travels between nodes: its bytes always match `shape` × `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl WireTensor {
    /// Checks that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let elements = element_count(&shape)?;
        let expected = elements
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::InvalidTensor(format!("shape {shape:?} overflows the address space")))?;
        if data.len() != expected {
            return Err(Error::InvalidTensor(format!(
                "{} bytes do not match shape {shape:?} of {} ({expected} bytes expected)",
                data.len(),
                dtype.name()
            )));
        }
        Ok(Self { dtype, shape, data })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Raw little-endian bytes in C order.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Takes the parts apart without copying.
    pub fn into_parts(self) -> (DType, Vec<usize>, Vec<u8>) {
        (self.dtype, self.shape, self.data)
    }

    /// Validates a tensor given as numpy's dtype name, signed dims and bytes.
    pub fn from_parts(dtype: &str, shape: &[i64], data: Vec<u8>) -> Result<Self> {
        let dtype = DType::from_name(dtype)?;
        let shape = shape
            .iter()
            .map(|&d| {
                usize::try_from(d)
                    .map_err(|_| Error::InvalidTensor(format!("negative dimension {d} in shape {shape:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(dtype, shape, data)
    }

    /// Validates a protobuf tensor, taking over its bytes without copying.
    pub fn from_proto(tensor: proto::Tensor) -> Result<Self> {
        let shape: Vec<i64> = tensor.shape.iter().map(|&d| i64::from(d)).collect();
        Self::from_parts(&tensor.dtype, &shape, tensor.tensor_data)
    }

    /// The protobuf form; fails only when a dimension exceeds the wire's `int32`.
    pub fn into_proto(self) -> Result<proto::Tensor> {
        let shape = self
            .shape
            .iter()
            .map(|&d| {
                i32::try_from(d)
                    .map_err(|_| Error::InvalidTensor(format!("dimension {d} does not fit the wire's int32")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(proto::Tensor { tensor_data: self.data, shape, dtype: self.dtype.name().to_string() })
    }

    /// A candle tensor on `device` holding a copy of the elements (one copy).
    pub fn to_candle(&self, device: &Device) -> Result<Tensor> {
        fn typed<T: candle_core::WithDType + bytemuck::Pod>(
            bytes: &[u8],
            shape: &[usize],
            device: &Device,
        ) -> Result<Tensor> {
            // Copy into a Vec<T> so the elements are aligned whatever the byte buffer's alignment.
            let mut elements = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut elements).copy_from_slice(bytes);
            Ok(Tensor::from_vec(elements, shape, device)?)
        }
        let (bytes, shape) = (self.data.as_slice(), self.shape.as_slice());
        match self.dtype {
            DType::U8 => typed::<u8>(bytes, shape, device),
            DType::U32 => typed::<u32>(bytes, shape, device),
            DType::I16 => typed::<i16>(bytes, shape, device),
            DType::I32 => typed::<i32>(bytes, shape, device),
            DType::I64 => typed::<i64>(bytes, shape, device),
            DType::BF16 => typed::<bf16>(bytes, shape, device),
            DType::F16 => typed::<f16>(bytes, shape, device),
            DType::F32 => typed::<f32>(bytes, shape, device),
            DType::F64 => typed::<f64>(bytes, shape, device),
        }
    }

    /// The wire form of a candle tensor on any device (one copy for contiguous CPU tensors).
    pub fn from_candle(tensor: &Tensor) -> Result<Self> {
        let dtype = DType::from_candle(tensor.dtype())?;
        let shape = tensor.dims().to_vec();
        let on_cpu = tensor.to_device(&Device::Cpu)?;
        let contiguous = on_cpu.contiguous()?;
        let (storage, layout) = contiguous.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::InvalidTensor("tensor is not contiguous after contiguous()".into()))?;
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::InvalidTensor("tensor is not on the CPU after to_device(Cpu)".into()));
        };
        let data = match cpu {
            CpuStorage::U8(v) => v[start..end].to_vec(),
            CpuStorage::U32(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::I16(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::I32(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::I64(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::F32(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            CpuStorage::F64(v) => bytemuck::cast_slice(&v[start..end]).to_vec(),
            _ => return Err(Error::InvalidTensor(format!("candle dtype {:?} has no wire encoding", dtype))),
        };
        Self::new(dtype, shape, data)
    }
}

/// Number of elements in `shape` (1 for a scalar), or an error if it overflows. The strides
/// must fit too: an empty tensor's other dimensions still multiply into them (candle's
/// strides overflowed on `[0, 5, 2^31-1, 2^31-1]`, found by fuzz_wire_tensor).
fn element_count(shape: &[usize]) -> Result<usize> {
    let overflow =
        || Error::InvalidTensor(format!("shape {shape:?} has more elements than the address space holds"));
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d.max(1))).ok_or_else(overflow)?;
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto_tensor(dtype: &str, shape: Vec<i32>, bytes: usize) -> proto::Tensor {
        proto::Tensor { tensor_data: vec![0; bytes], shape, dtype: dtype.into() }
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()).unwrap(), d);
            assert_eq!(DType::from_candle(d.to_candle()).unwrap(), d);
        }
    }

    #[test]
    fn proto_to_candle_and_back_keeps_values() {
        let values = [1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5];
        let wire = proto::Tensor {
            tensor_data: bytemuck::cast_slice(&values).to_vec(),
            shape: vec![1, 2, 3],
            dtype: "float32".into(),
        };
        let tensor = WireTensor::from_proto(wire.clone()).unwrap().to_candle(&Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), &[1, 2, 3]);
        assert_eq!(tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values);
        assert_eq!(WireTensor::from_candle(&tensor).unwrap().into_proto().unwrap(), wire);
    }

    #[test]
    fn every_dtype_survives_candle() {
        for d in DType::ALL {
            let data: Vec<u8> = (0..4 * d.size_in_bytes()).map(|i| (i % 7) as u8).collect();
            let wire = WireTensor::new(d, vec![2, 2], data).unwrap();
            let back = WireTensor::from_candle(&wire.to_candle(&Device::Cpu).unwrap()).unwrap();
            assert_eq!(back, wire, "{}", d.name());
        }
    }

    #[test]
    fn non_contiguous_candle_tensor_is_encoded_in_c_order() {
        let t = Tensor::arange(0i64, 6, &Device::Cpu).unwrap().reshape((2, 3)).unwrap().t().unwrap();
        let wire = WireTensor::from_candle(&t).unwrap();
        assert_eq!(wire.shape(), &[3, 2]);
        assert_eq!(bytemuck::cast_slice::<u8, i64>(wire.data()), &[0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn scalar_has_one_element() {
        assert!(WireTensor::new(DType::F32, vec![], vec![0; 4]).is_ok());
    }

    #[test]
    fn bad_tensors_are_clear_errors() {
        let cases = [
            (proto_tensor("float32", vec![2, 3], 23), "23 bytes do not match shape [2, 3] of float32"),
            (proto_tensor("complex64", vec![1], 8), "unknown dtype \"complex64\""),
            (proto_tensor("float32", vec![2, -3], 24), "negative dimension -3"),
            (proto_tensor("float64", vec![i32::MAX, i32::MAX, i32::MAX], 8), "address space"),
        ];
        for (tensor, message) in cases {
            let err = WireTensor::from_proto(tensor).unwrap_err().to_string();
            assert!(err.contains(message), "{err:?} should contain {message:?}");
        }
    }

    #[test]
    fn element_count_overflow_is_an_error() {
        assert!(element_count(&[usize::MAX, 2]).is_err());
        assert_eq!(element_count(&[1 << 20, 0]).unwrap(), 0);
        assert!(element_count(&[0, 5, i32::MAX as usize, i32::MAX as usize]).is_err());
    }
}
