"""numpy arrays survive the wire encoding exactly; bad wire tensors raise clear errors."""

import numpy as np
import pytest

from exo._core import ndarray_from_wire, ndarray_to_wire
from exo.errors import ExoError, InvalidTensorError

DTYPES = ["uint8", "uint32", "int16", "int32", "int64", "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(dtype: str) -> None:
    array = (np.arange(24) % 11 - 3).astype(dtype).reshape(2, 3, 4)
    data, shape, name = ndarray_to_wire(array)
    assert (shape, name) == ([2, 3, 4], dtype)
    assert data == array.tobytes()
    back = ndarray_from_wire(data, shape, name)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_non_contiguous_and_big_endian_inputs_are_normalized() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    data, shape, _ = ndarray_to_wire(array)
    np.testing.assert_array_equal(ndarray_from_wire(data, shape, "float32"), array)
    big = np.arange(5, dtype=">i4")
    data, shape, name = ndarray_to_wire(big)
    assert name == "int32" and data == np.arange(5, dtype="<i4").tobytes()


def test_scalar_and_empty() -> None:
    data, shape, name = ndarray_to_wire(np.float32(2.5))
    assert shape == [] and ndarray_from_wire(data, shape, name) == np.float32(2.5)
    data, shape, name = ndarray_to_wire(np.zeros((0, 7), dtype=np.float32))
    assert data == b"" and ndarray_from_wire(data, shape, name).shape == (0, 7)


def test_decoded_array_is_writable_and_owned() -> None:
    back = ndarray_from_wire(np.ones(4, dtype=np.float32).tobytes(), [4], "float32")
    back[0] = 5.0
    assert back.tolist() == [5.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("data", "shape", "dtype", "message"),
    [
        (b"\0" * 23, [2, 3], "float32", "23 bytes do not match shape \\[2, 3\\] of float32"),
        (b"\0" * 8, [1], "complex64", "unknown dtype"),
        (b"\0" * 24, [2, -3], "float32", "negative dimension -3"),
        (b"\0" * 8, [2**40, 2**40, 2**40], "float64", "address space"),
    ],
)
def test_bad_wire_tensors(data: bytes, shape: list[int], dtype: str, message: str) -> None:
    with pytest.raises(InvalidTensorError, match=message) as info:
        ndarray_from_wire(data, shape, dtype)
    assert isinstance(info.value, ExoError)


def test_unsupported_array_dtype_is_rejected() -> None:
    with pytest.raises(InvalidTensorError, match='unknown dtype "bool"'):
        ndarray_to_wire(np.array([True, False]))
