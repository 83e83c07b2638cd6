"""Chat request JSON under fuzzing (hypothesis): raw bytes, any JSON, and valid requests with fields bent. Every
body is either a request within the limits or a 400 that names what is wrong; nothing else escapes. Cases per
test: `HYPOTHESIS_CASES` (200 by default)."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo.api.chat_request import MAX_TOP_K, ApiError, ChatRequest, parse_chat_request, parse_json_object
from exo.api.limits import ApiLimits

CASES = int(os.environ.get("HYPOTHESIS_CASES", "200"))
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ApiLimits(max_messages=8, max_context=4096)

edge_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 1e308, float("nan")]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), edge_numbers, st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
VALID: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": False,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "max_tokens": 16,
    "seed": 1,
    "stop": ["\n"],
    "stream_options": {"include_usage": True},
}


@st.composite
def bent_requests(draw: st.DrawFn) -> dict[str, Any]:
    """`VALID` with some fields replaced by any JSON value, removed, or messages bent."""
    request = dict(VALID)
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=4)):
        if draw(st.booleans()):
            request[key] = draw(json_values)
        else:
            request.pop(key, None)
    if draw(st.booleans()):
        message = {"role": draw(st.sampled_from(["user", "system", "tool", ""])), "content": draw(json_values)}
        request["messages"] = [message] * draw(st.integers(min_value=0, max_value=10))
    return request


def check(body: bytes) -> None:
    """The property: a valid request within `LIMITS`, or an `ApiError` 400 with a code and a message."""
    try:
        request = parse_chat_request(parse_json_object(body), LIMITS)
    except ApiError as e:
        assert e.status == 400, e.message
        assert e.code and len(e.message) > 10, e.to_dict()
        return
    assert isinstance(request, ChatRequest)
    assert 1 <= len(request.messages) <= LIMITS.max_messages
    assert all(isinstance(m["content"], str) for m in request.messages)
    assert request.max_tokens is None or 1 <= request.max_tokens <= LIMITS.max_context
    assert request.top_k is None or 0 <= request.top_k <= MAX_TOP_K
    assert request.temperature is None or 0 <= request.temperature <= 2
    assert request.seed is None or 0 <= request.seed < 2**64


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_raw_bodies(body: bytes) -> None:
    check(body)


@FUZZ
@given(json_values)
def test_fuzz_any_json(value: Any) -> None:
    check(json.dumps(value).encode())


@FUZZ
@given(bent_requests())
def test_fuzz_bent_requests(request: dict[str, Any]) -> None:
    check(json.dumps(request).encode())
