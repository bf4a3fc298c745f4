"""Property-based fuzzing of what reads untrusted input: the one HTTP body parser
(core.http.parse_json_object), the policy's TGI and OpenAI request builders, and the feedback
service's JSON conversion and validator. Whatever they are given, they answer or raise a
FlywheelError (a precise 4xx / INVALID_ARGUMENT), never anything else, which a front end would
turn into a 500. Derandomized and bounded, so CI runs the same examples every time, fast.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.core import errors
from flywheel.core.http import MAX_JSON_DEPTH, parse_json_object
from flywheel.core.limits import LimitsConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import JSON_FIELDS, request_from_json
from flywheel.feedback.validation import validate
from flywheel.policy.http import TGI_BODY, TGI_PARAMS, tgi_request
from flywheel.policy.openai_routes import CHAT_FIELDS, COMPLETION_FIELDS, openai_request
from flywheel.policy.requests import validate_request
from flywheel.v1 import feedback_pb2

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Numbers a JSON parser can hand over, including the awkward ones (a caller of the validators
# that does not use parse_json_object may pass any of them).
AWKWARD_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, -(2**31) - 1, 2**63, 2**64, -(2**64), 10**400, 1e-45, 1e-40, 1e308, -0.0, 0.5, 7, 99]
)
NUMBERS = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), AWKWARD_NUMBERS)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))


def values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON-like values whose objects use `keys` (a request's own field names, mostly)."""
    return st.recursive(
        SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=12
    )


def objects(fields: tuple[str, ...] | list[str], nested: tuple[str, ...] | list[str] = ()) -> st.SearchStrategy[Any]:
    """Dicts over a request's fields (and a few unknown names), values of any JSON type."""
    keys = st.one_of(st.sampled_from([*fields, *nested]), st.text(max_size=8))
    return st.dictionaries(keys, values(keys), max_size=8)


def only_flywheel_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except errors.FlywheelError as e:
        assert 400 <= e.http_status < 500, (e.http_status, e.message)
        assert e.message and len(e.message) < 1000, e.message


# ---------------------------------------------------------------------------- the body parser


@FUZZ
@given(st.binary(max_size=300))
def test_body_parser_takes_any_bytes(raw: bytes) -> None:
    only_flywheel_errors(parse_json_object, raw)


@st.composite
def mutated_json(draw: st.DrawFn) -> bytes:
    """Valid JSON text of any value, then cut short, spliced with bytes, nested deep, or left alone."""
    v = draw(values(st.text(max_size=6)))
    text = json.dumps(v, allow_nan=True, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["keep", "truncate", "splice", "wrap"]))
    if how == "truncate" and text:
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "splice":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    if how == "wrap":
        depth = draw(st.integers(1, 3 * MAX_JSON_DEPTH))
        return b'{"a":' * depth + text + b"}" * depth
    return text


@FUZZ
@given(mutated_json())
def test_body_parser_takes_any_json_like_text(raw: bytes) -> None:
    only_flywheel_errors(parse_json_object, raw)


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b"", 400, "the body is empty"),
        (b'{"inputs": "hi"', 400, "not valid JSON"),
        (b'{"inputs": "caf\xe9"}', 400, "not valid UTF-8 (byte 0xe9 at offset 15)"),
        (b'{"a": ' + b"9" * 5000 + b"}", 400, "an integer of over 4300 digits"),
        (b'{"a": [' + b"1," * 1000 + b"1e400]}", 400, "beyond a 64-bit float"),
        (b'{"a": 1e999}', 400, "beyond a 64-bit float"),
        (b'{"a": NaN}', 400, "NaN is not JSON"),
        (b'{"a": -Infinity}', 400, "-Infinity is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper than 32 levels"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, 400, "nests deeper than 32 levels"),
        (b'{"a": "\\udc00"}', 400, "lone UTF-16 surrogate (\\udc00)"),
        (b'["inputs"]', 422, "must be a JSON object, got a list"),
        (b"17", 422, "must be a JSON object, got a number"),
    ],
)
def test_body_parser_refusals(raw: bytes, status: int, says: str) -> None:
    with pytest.raises(errors.FlywheelError) as e:
        parse_json_object(raw)
    assert e.value.http_status == status and says in e.value.message, e.value.message


def test_body_parser_accepts_what_it_should() -> None:
    assert parse_json_object(b'{"a":' * 31 + b"1" + b"}" * 31)  # 32 levels with the top one
    assert parse_json_object('{"inputs": "caf\u00e9 \U0001f600", "n": 18446744073709551615}'.encode()) == {
        "inputs": "caf\u00e9 \U0001f600",
        "n": 2**64 - 1,
    }
    assert parse_json_object(b'{"t": 1e-40, "u": "\\ud83d\\ude00"}') == {"t": 1e-40, "u": "\U0001f600"}


# ---------------------------------------------------------------------------- the policy's routes

LIMITS = LimitsConfig()
# Any JSON value, awkward numbers twice as likely: the values that crashed routes before.
EXTREMES = st.sampled_from([10**400, -(10**400), 2**64, 1e308, -1e308, float("nan"), float("inf")])
WILD = st.one_of(EXTREMES, AWKWARD_NUMBERS, NUMBERS, values(st.sampled_from(["role", "content", "type", "text", "x"])))


@st.composite
def off_by_some(draw: st.DrawFn, base: dict[str, Any], fields: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A valid body with one to three of its fields set to any value (so the checks after the
    first are reached too, unlike with all-random bodies)."""
    body = json.loads(json.dumps(base))
    for name in draw(st.lists(st.sampled_from(list(fields)), min_size=1, max_size=3, unique=True)):
        body[name] = draw(WILD)
    return body


def admitted(build: Any, *args: Any) -> None:
    """An HTTP builder, then the checks every request meets before admission (policy/requests.py)."""
    req, _ = build(*args)
    validate_request(req, LIMITS, 16, 64)


@pytest.mark.parametrize(
    ("build", "body", "says"),
    [
        (tgi_request, {"inputs": "hi", "parameters": {"top_k": 10**400}}, "top_k"),
        (tgi_request, {"inputs": "hi", "parameters": {"max_new_tokens": 1e308}}, "max_new_tokens"),
        (tgi_request, {"inputs": "hi", "parameters": {"temperature": float("nan")}}, "temperature"),
        (tgi_request, {"inputs": "hi", "parameters": {"repetition_penalty": 10**400}}, "repetition_penalty"),
        (tgi_request, {"inputs": "hi", "parameters": 0}, "`parameters` must be a JSON object"),
        (openai_request, {"prompt": "hi", "top_k": 10**400}, "top_k"),
        (openai_request, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        (openai_request, {"prompt": "hi", "stream_options": []}, "`stream_options` must be an object"),
        (openai_request, {"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role must be one of"),
        (openai_request, {"messages": [{"role": {}, "content": "hi"}]}, "messages[0].role must be one of"),
        (openai_request, {"messages": ["hi"]}, "messages[0] must be an object"),
    ],
)
def test_route_regressions(build: Any, body: dict[str, Any], says: str) -> None:
    """Values that once raised TypeError / OverflowError (a 500) or slipped through as a default."""
    args = (body, "messages" in body) if build is openai_request else (body,)
    with pytest.raises(errors.InvalidArgument) as e:
        admitted(build, *args)
    assert says in e.value.message, e.value.message


@FUZZ
@given(objects(TGI_BODY, TGI_PARAMS))
def test_tgi_request_takes_any_object(body: dict[str, Any]) -> None:
    only_flywheel_errors(admitted, tgi_request, body)


@FUZZ
@given(off_by_some({}, TGI_PARAMS), st.booleans())
def test_tgi_parameters_take_any_values(params: dict[str, Any], stream: bool) -> None:
    only_flywheel_errors(admitted, tgi_request, {"inputs": "hi", "parameters": params, "stream": stream})


@FUZZ
@given(off_by_some({"prompt": "hi"}, COMPLETION_FIELDS))
def test_openai_completion_takes_any_values(body: dict[str, Any]) -> None:
    only_flywheel_errors(admitted, openai_request, body, False)


@FUZZ
@given(
    off_by_some({"messages": [{"role": "user", "content": "hi"}]}, CHAT_FIELDS), off_by_some({}, ["role", "content"])
)
def test_openai_chat_takes_any_values(body: dict[str, Any], message: dict[str, Any]) -> None:
    only_flywheel_errors(admitted, openai_request, body, True)
    only_flywheel_errors(admitted, openai_request, {"messages": [{"role": "user", "content": "hi"}, message]}, True)


@FUZZ
@given(objects(CHAT_FIELDS, ("role", "content", "type", "text")), st.booleans())
def test_openai_request_takes_any_object(body: dict[str, Any], chat: bool) -> None:
    only_flywheel_errors(admitted, openai_request, body, chat)


# ---------------------------------------------------------------------------- the feedback service

CFG = FeedbackConfig()


def feedback_json_then_validate(body: Any) -> None:
    validate(request_from_json(body, CFG.rating_scale), CFG)


@FUZZ
@given(objects(JSON_FIELDS) | values(st.sampled_from(JSON_FIELDS)))
def test_feedback_json_takes_any_value(body: Any) -> None:
    only_flywheel_errors(feedback_json_then_validate, body)


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "feedback_id": st.text(max_size=3),
            "user_id": st.text(max_size=3),
            "interaction_id": st.text(max_size=3),
            "pair_id": st.text(max_size=3),
        },
        optional={
            "thumbs": st.integers(-(2**31), 2**31 - 1),
            "rating": st.integers(-(2**31), 2**31 - 1),
            "preference": st.integers(-(2**31), 2**31 - 1),  # an open enum: any int32 arrives over gRPC
            "demonstration": st.text(max_size=5),
            "comment": st.text(max_size=5),
        },
    )
)
def test_feedback_validator_takes_any_request(fields: dict[str, Any]) -> None:
    value_fields = [k for k in ("thumbs", "rating", "preference", "demonstration") if k in fields]
    for extra in value_fields[1:]:  # a oneof holds one; keep the first drawn
        del fields[extra]
    only_flywheel_errors(validate, feedback_pb2.FeedbackRequest(**fields), CFG)
