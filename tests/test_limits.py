"""`--max-kv-cache-gb` and `--max-context` (and `EXO_MAX_KV_CACHE_GB`, `EXO_MAX_CONTEXT`) through the real command line:
they reach the engine, `/topology` reports them per node, and a bad value stops the node naming the flag."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from support.solo_cli import NODE_ID, run_solo, serving_solo


def _limits(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/topology", timeout=10) as response:
        return json.load(response)["nodes"][NODE_ID]["limits"]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--max-context", "512", "--max-kv-cache-gb", "0.5"), {}),
        ((), {"EXO_MAX_CONTEXT": "512", "EXO_MAX_KV_CACHE_GB": "0.5"}),
    ],
    ids=["flags", "environment"],
)
def test_topology_reports_the_limits_set(tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    with serving_solo(tmp_path, *args, env=env) as (url, _):
        assert _limits(url) == {"max_context": 512, "max_kv_cache_gb": 0.5}


def test_without_settings_the_context_follows_the_model(tmp_path: Path) -> None:
    """Before a model loads the context is `None` (derived per model); the budget is a quarter of memory."""
    with serving_solo(tmp_path) as (url, _):
        limits = _limits(url)
        assert limits["max_context"] is None
        assert limits["max_kv_cache_gb"] > 0


def test_a_bad_limit_stops_the_node_naming_it(tmp_path: Path) -> None:
    done = run_solo(tmp_path, "--max-kv-cache-gb", "-1")
    assert done.returncode == 2
    assert "argument --max-kv-cache-gb: '-1' is not a positive number" in done.stderr


def test_a_bad_limit_in_the_environment_stops_the_node_naming_it(tmp_path: Path) -> None:
    done = run_solo(tmp_path, env={"EXO_MAX_CONTEXT": "lots"})
    assert done.returncode == 2
    assert 'EXO_MAX_CONTEXT="lots" is not a number' in done.stderr
