from __future__ import annotations

import json

import pytest

from swapper.config.schema import Filters
from swapper.core.errors import BadRequest
from swapper.http.modelid import extract
from swapper.http.shaping import rewrite_body

JSON = "application/json"
BOUNDARY = "XyZboundary123"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
NO_FILTERS = Filters()


def rewrite(
    body: bytes,
    content_type: str | None = JSON,
    *,
    model_name: str | None = None,
    filters: Filters = NO_FILTERS,
    requested: str = "m",
    is_json: bool = False,
) -> bytes:
    return rewrite_body(
        content_type, body, model_name=model_name, filters=filters, requested=requested, is_json=is_json
    )


def form(*parts: tuple[str, bytes], file: bytes = b"") -> bytes:
    out = b""
    for name, value in parts:
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    if file:
        out += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                "Content-Type: audio/wav\r\n\r\n"
            ).encode()
            + file
            + b"\r\n"
        )
    return out + f"--{BOUNDARY}--\r\n".encode()


# --- nothing applies: the same object comes back ----------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'{ "model" : "m",  "stream": true }'),
        (JSON, b"not even json"),  # never looked at
        (MULTIPART, form(("model", b"m"))),
        ("text/plain", b"x"),
    ],
)
def test_nothing_configured_returns_the_same_object(content_type: str, body: bytes) -> None:
    assert rewrite(body, content_type) is body


def test_filters_for_another_alias_do_not_apply() -> None:
    body = b'{"model":"m", "x": 1}'
    filters = Filters(set_params_by_id={"other": {"x": 2}})
    assert rewrite(body, filters=filters, requested="m") is body


def test_use_model_name_already_equal_returns_the_same_object() -> None:
    body = b'{"model": "openai/x", "messages": []}'
    assert rewrite(body, model_name="openai/x") is body


def test_strip_of_absent_keys_returns_the_same_object() -> None:
    body = b'{"model": "m", "top_k": 3}'
    assert rewrite(body, filters=Filters(strip_params=("temperature",))) is body


def test_filters_leave_non_json_bodies_alone() -> None:
    body = b"model=m&temperature=1"
    filters = Filters(strip_params=("temperature",), set_params={"x": 1})
    assert rewrite(body, "application/x-www-form-urlencoded", filters=filters, model_name="y") is body
    multipart = form(("model", b"m"), ("temperature", b"1"))
    assert rewrite(multipart, MULTIPART, filters=filters) is multipart


def test_empty_body_is_returned() -> None:
    body = b""
    assert rewrite(body, model_name="x") is body


# --- useModelName -----------------------------------------------------------------------------


def test_use_model_name_json() -> None:
    body = '{"model": "alias", "messages": [{"role": "user", "content": "hé"}]}'.encode()
    out = rewrite(body, model_name="openai/x")
    assert json.loads(out) == {"model": "openai/x", "messages": [{"role": "user", "content": "hé"}]}
    assert "hé".encode() in out  # kept as UTF-8, not \\u-escaped


def test_use_model_name_json_adds_missing_model() -> None:
    assert json.loads(rewrite(b'{"prompt": "x"}', model_name="real")) == {"prompt": "x", "model": "real"}


def test_use_model_name_typeless_json() -> None:
    assert json.loads(rewrite(b'{"model": "a"}', None, model_name="b")) == {"model": "b"}


def test_use_model_name_multipart_rewrites_only_the_value() -> None:
    audio = bytes(range(256)) * 4096 + b"\r\n--almost" + b"\r\n"  # 1 MiB of every byte value
    body = form(("language", b"en"), ("model", b"whisper"), file=audio)
    out = rewrite(body, MULTIPART, model_name="whisper-large-v3")
    assert out == body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-large-v3\r\n", 1)
    assert extract("POST", MULTIPART, out, {}).model == "whisper-large-v3"


def test_use_model_name_multipart_every_model_field() -> None:
    body = form(("model", b"a"), ("model", b"b"))
    assert rewrite(body, MULTIPART, model_name="z") == form(("model", b"z"), ("model", b"z"))


def test_use_model_name_multipart_same_value_returns_the_same_object() -> None:
    body = form(("model", b"z"), file=b"data")
    assert rewrite(body, MULTIPART, model_name="z") is body


def test_use_model_name_multipart_adds_a_missing_model_field() -> None:
    body = form(("language", b"en"), file=b"data")
    out = rewrite(body, MULTIPART, model_name="real")
    assert out.startswith(body[: -len(f"--{BOUNDARY}--\r\n")])
    assert extract("POST", MULTIPART, out, {}).model == "real"
    empty = f"--{BOUNDARY}--\r\n".encode()
    assert extract("POST", MULTIPART, rewrite(empty, MULTIPART, model_name="real"), {}).model == "real"


def test_use_model_name_malformed_multipart_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        rewrite(b"garbage", MULTIPART, model_name="x")


# --- filters: order and semantics ------------------------------------------------------------


def test_strip_params_never_strips_model() -> None:
    body = b'{"model": "m", "temperature": 0.7, "top_p": 0.9, "n": 1}'
    out = rewrite(body, filters=Filters(strip_params=("temperature", "model", "top_p")))
    assert json.loads(out) == {"model": "m", "n": 1}


def test_set_params_replace_whole_values_and_ignore_model() -> None:
    body = b'{"model": "m", "provider": {"zdr": false, "other": 1}}'
    filters = Filters(set_params={"provider": {"zdr": True}, "model": "evil", "seed": 42})
    assert json.loads(rewrite(body, filters=filters)) == {"model": "m", "provider": {"zdr": True}, "seed": 42}


def test_order_use_model_name_strip_set_then_by_id() -> None:
    body = b'{"model": "fast", "temperature": 0.2, "top_k": 5}'
    filters = Filters(
        strip_params=("temperature", "top_k"),
        set_params={"temperature": 0.5, "max_tokens": 100},
        set_params_by_id={"fast": {"temperature": 0.9, "model": "ignored"}, "slow": {"temperature": 0.1}},
    )
    out = rewrite(body, model_name="upstream-name", filters=filters, requested="fast")
    # strip removed top_k; setParams re-set temperature; setParamsByID["fast"] won; model untouchable
    assert json.loads(out) == {"model": "upstream-name", "temperature": 0.9, "max_tokens": 100}
    out = rewrite(body, filters=filters, requested="slow")
    assert json.loads(out) == {"model": "fast", "temperature": 0.1, "max_tokens": 100}


def test_json_sent_under_another_type_is_rewritten_when_modelid_read_it_as_json() -> None:
    body = b'{"model": "m", "temperature": 1}'  # curl -d: "urlencoded"
    wanted = extract("POST", "application/x-www-form-urlencoded", body, {})
    assert wanted.is_json
    strip = Filters(strip_params=("temperature",))
    out = rewrite(body, "application/x-www-form-urlencoded", filters=strip, is_json=wanted.is_json)
    assert json.loads(out) == {"model": "m"}
    assert rewrite(body, "application/x-www-form-urlencoded", filters=strip) is body  # not JSON to it


def test_lone_surrogate_round_trips() -> None:
    out = rewrite(b'{"model": "m", "text": "\\ud800"}', model_name="x")
    assert json.loads(out) == {"model": "x", "text": "\ud800"}


def test_malformed_json_with_filters_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        rewrite(b'{"model":', model_name="x")


def test_a_rewritten_body_keeps_numbers_exact() -> None:
    # modelid reads bodies with orjson, which reads an integer over 64 bits as a float; a
    # rewrite must not turn the client's seed into 1.2345678901234568e+29.
    body = b'{"model": "m", "seed": 123456789012345678901234567890, "temperature": 0.1}'
    wanted = extract("POST", JSON, body, {})
    out = rewrite(body, filters=Filters(set_params={"top_k": 5}), is_json=wanted.is_json)
    assert b'"seed":123456789012345678901234567890' in out
    assert json.loads(out) == {
        "model": "m",
        "seed": 123456789012345678901234567890,
        "temperature": 0.1,
        "top_k": 5,
    }
