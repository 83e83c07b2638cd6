"""`exo.inference.shard` behaves as exo classic's frozen dataclass."""

import pickle

import pytest

from exo.errors import ExoError, InvalidArgumentError
from exo.inference.shard import Shard, shards_overlap


def test_fields_and_layer_helpers() -> None:
    shard = Shard("llama-3.2-1b", 0, 7, 16)
    assert (shard.model_id, shard.start_layer, shard.end_layer, shard.n_layers) == ("llama-3.2-1b", 0, 7, 16)
    assert shard.is_first_layer() and not shard.is_last_layer()
    assert shard.get_layer_count() == 8
    assert Shard(model_id="m", start_layer=8, end_layer=15, n_layers=16).is_last_layer()


def test_frozen_equal_and_hashable() -> None:
    a, b = Shard("m", 0, 1, 2), Shard("m", 0, 1, 2)
    assert a == b and hash(a) == hash(b)
    assert a != Shard("m", 0, 0, 2)
    assert len({a, b, Shard("m", 1, 1, 2)}) == 2
    with pytest.raises(AttributeError):
        a.start_layer = 3  # type: ignore[misc]


def test_dict_round_trip_and_pickle() -> None:
    shard = Shard("m", 3, 5, 10)
    assert shard.to_dict() == {"model_id": "m", "start_layer": 3, "end_layer": 5, "n_layers": 10}
    assert Shard.from_dict(shard.to_dict()) == shard
    assert pickle.loads(pickle.dumps(shard)) == shard
    assert repr(shard) == "Shard(model_id='m', start_layer=3, end_layer=5, n_layers=10)"


def test_from_dict_names_the_missing_key() -> None:
    with pytest.raises(InvalidArgumentError, match="start_layer") as info:
        Shard.from_dict({"model_id": "m", "end_layer": 1, "n_layers": 2})
    assert isinstance(info.value, ExoError) and isinstance(info.value, ValueError)


def test_placeholder_shards_are_allowed() -> None:
    # exo classic builds these as defaults; construction must not reject them.
    assert Shard("", 0, 0, 0).get_layer_count() == 1
    assert Shard("m", -1, -1, 4).start_layer == -1


def test_overlap() -> None:
    a = Shard("m", 0, 3, 8)
    assert a.overlaps(Shard("m", 3, 7, 8))
    assert not shards_overlap(a, Shard("m", 4, 7, 8))
    assert not shards_overlap(a, Shard("other", 0, 3, 8))
