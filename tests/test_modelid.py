from __future__ import annotations

import json
import time

import pytest

from swapper.core.errors import BadRequest
from swapper.http.modelid import RequestModel, body_kind, extract, multipart_boundary, scan_multipart

JSON = "application/json"
BOUNDARY = "----swapperBoundary7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(
    *parts: tuple[str, bytes] | tuple[str, bytes, str], boundary: str = BOUNDARY, nl: bytes = b"\r\n"
) -> bytes:
    """Encode parts as a browser would; a third element makes the part a file with that name."""
    out = []
    for part in parts:
        name, value = part[0], part[1]
        disposition = f'form-data; name="{name}"'
        headers = [b"Content-Disposition: " + disposition.encode()]
        if len(part) == 3:
            headers[0] += f'; filename="{part[2]}"'.encode()
            headers.append(b"Content-Type: application/octet-stream")
        out.append(b"--" + boundary.encode() + nl + nl.join(headers) + nl + nl + value + nl)
    return b"".join(out) + b"--" + boundary.encode() + b"--" + nl


# --- JSON -------------------------------------------------------------------------------------


def test_json_model_and_stream() -> None:
    got = extract("POST", JSON, b'{"model": "m1", "stream": true, "messages": []}', {})
    assert got == RequestModel("m1", True)
    assert got.is_json


def test_json_without_stream_is_not_streaming() -> None:
    assert extract("POST", "application/json; charset=utf-8", b'{"model":"a/b:c"}', {}) == RequestModel(
        "a/b:c", False
    )


def test_json_stream_must_be_a_real_bool() -> None:
    assert extract("POST", JSON, b'{"model":"m","stream":"true"}', {}).stream is False
    assert extract("POST", JSON, b'{"model":"m","stream":1}', {}).stream is False


def test_json_content_type_is_case_insensitive_and_vendor_types_count() -> None:
    assert extract("POST", "Application/JSON", b'{"model":"m"}', {}).model == "m"
    assert extract("POST", "application/vnd.api+json", b'{"model":"m"}', {}).model == "m"


def test_typeless_body_starting_with_brace_is_json() -> None:
    assert extract("POST", None, b' \n{"model":"m","stream":true}', {}) == RequestModel("m", True)
    assert extract("POST", "", b'{"model":"m"}', {}).model == "m"


def test_json_missing_model_falls_back_to_query() -> None:
    assert extract("POST", JSON, b'{"prompt":"hi"}', {"model": "q"}).model == "q"
    assert extract("POST", JSON, b'{"model":"","prompt":"hi"}', {"model": "q"}).model == "q"
    assert extract("POST", JSON, b'{"model":null}', {}).model is None


def test_body_model_wins_over_query() -> None:
    assert extract("POST", JSON, b'{"model":"body"}', {"model": "query"}).model == "body"


def test_nested_model_keys_are_not_the_model() -> None:
    body = b'{"messages":[{"role":"user","content":"x","model":"nested"}],"model":"top"}'
    assert extract("POST", JSON, body, {}).model == "top"
    assert extract("POST", JSON, b'{"tools":[{"model":"nested"}]}', {}).model is None


def test_unicode_model_id() -> None:
    assert extract("POST", JSON, json.dumps({"model": "modèle"}).encode(), {}).model == "modèle"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m",',
        b"{not json}",
        b'{"model": "m"} trailing',
        b"\xff\xfe{",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_json_is_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="invalid JSON body"):
        extract("POST", JSON, body, {})


@pytest.mark.parametrize("body", [b"[1, 2]", b'"m"', b"42", b"null"])
def test_json_that_is_not_an_object_is_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="expected an object"):
        extract("POST", JSON, body, {})


@pytest.mark.parametrize("model", [b"42", b"true", b'["m"]', b'{"id":"m"}'])
def test_json_model_not_a_string_is_bad_request(model: bytes) -> None:
    with pytest.raises(BadRequest, match='"model" must be a string'):
        extract("POST", JSON, b'{"model":' + model + b"}", {})


def test_empty_json_body_uses_query() -> None:
    assert extract("POST", JSON, b"", {"model": "q", "stream": "true"}) == RequestModel("q", True)


# --- query, urlencoded, other -----------------------------------------------------------------


def test_get_uses_query_and_ignores_body() -> None:
    got = extract("GET", JSON, b'{"model":"body"}', {"model": "m1", "stream": "true"})
    assert got == RequestModel("m1", True)
    assert extract("GET", None, b"", {}) == RequestModel(None, False)
    assert extract("HEAD", None, b"", {"model": "m", "stream": "false"}) == RequestModel("m", False)


def test_urlencoded_form() -> None:
    body = b"model=author%2Fmodel&stream=true&prompt=a+b"
    got = extract("POST", "application/x-www-form-urlencoded", body, {})
    assert got == RequestModel("author/model", True)


def test_urlencoded_falls_back_to_query() -> None:
    got = extract("POST", "application/x-www-form-urlencoded", b"prompt=x", {"model": "q"})
    assert got == RequestModel("q", False)


def test_urlencoded_invalid_utf8_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        extract("POST", "application/x-www-form-urlencoded", b"model=\xff", {})


def test_unknown_content_type_uses_query() -> None:
    assert extract("POST", "text/plain", b"model=x", {"model": "q"}) == RequestModel("q", False)
    assert extract("POST", None, b"model=x", {}) == RequestModel(None, False)


def test_body_kind() -> None:
    assert body_kind("application/json", b"") == "json"
    assert body_kind(None, b"{}") == "json"
    assert body_kind(None, b"[]") == "other"
    assert body_kind(MULTIPART, b"") == "multipart"
    assert body_kind("application/x-www-form-urlencoded", b"") == "urlencoded"


# --- multipart --------------------------------------------------------------------------------


def test_multipart_model_and_stream() -> None:
    body = multipart(("model", b"whisper"), ("stream", b"true"), ("file", b"RIFF....", "a.wav"))
    assert extract("POST", MULTIPART, body, {}) == RequestModel("whisper", True)


def test_multipart_model_after_file_part() -> None:
    body = multipart(("file", b"\r\n--not-the-boundary\r\n" * 10, "a.wav"), ("model", b"whisper"))
    assert extract("POST", MULTIPART, body, {}) == RequestModel("whisper", False)


def test_multipart_filename_is_not_name() -> None:
    body = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; filename="model"; name="file"\r\n\r\n'
        "data\r\n"
        f"--{BOUNDARY}\r\n"
        'content-disposition: form-data; name="model"\r\n\r\n'
        "m1\r\n"
        f"--{BOUNDARY}--\r\n"
    ).encode()
    assert extract("POST", MULTIPART, body, {}).model == "m1"


def test_multipart_quoted_boundary_preamble_and_lf_only() -> None:
    boundary = "b o=u;nd"
    body = b"preamble text\n" + multipart(("model", b"m2"), boundary=boundary, nl=b"\n")
    got = extract("POST", f'multipart/form-data; charset=utf-8; boundary="{boundary}"', body, {})
    assert got.model == "m2"


def test_multipart_first_value_wins_and_query_fallback() -> None:
    body = multipart(("model", b"first"), ("model", b"second"))
    assert extract("POST", MULTIPART, body, {}).model == "first"
    body = multipart(("file", b"x", "a.wav"))
    assert extract("POST", MULTIPART, body, {"model": "q", "stream": "true"}) == RequestModel("q", True)


def test_multipart_empty_form() -> None:
    body = f"--{BOUNDARY}--\r\n".encode()
    assert extract("POST", MULTIPART, body, {}) == RequestModel(None, False)


def test_multipart_large_file_part_is_fast() -> None:
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB, every byte value, many CRLFs
    body = multipart(("file", payload, "big.wav"), ("model", b"whisper"), ("stream", b"true"))
    started = time.perf_counter()
    got = extract("POST", MULTIPART, body, {})
    elapsed = time.perf_counter() - started
    assert got == RequestModel("whisper", True)
    assert elapsed < 0.5, elapsed  # one bytes.find pass; generous for slow CI


def test_multipart_64_mib_is_a_single_scan() -> None:
    payload = b"\0" * (64 * 1024 * 1024)
    body = multipart(("model", b"m"), ("file", payload, "big.bin"))
    started = time.perf_counter()
    assert extract("POST", MULTIPART, body, {}).model == "m"
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data", b"--x\r\n\r\n--x--", "boundary"),
        ('multipart/form-data; boundary=""', b"--x\r\n\r\n--x--", "boundary"),
        (MULTIPART, b"no delimiter here", "boundary not found"),
        (MULTIPART, f"--{BOUNDARY}".encode(), "truncated"),
        (MULTIPART, f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"'.encode(), "headers"),
        (MULTIPART, f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="m"\r\n\r\nv'.encode(), "closing"),
        (
            MULTIPART,
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="m"\r\n\r\nv\r\n--{BOUNDARY}'.encode(),
            "closing",
        ),
    ],
)
def test_malformed_multipart_is_bad_request(content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        extract("POST", content_type, body, {})


def test_multipart_model_must_be_utf8() -> None:
    with pytest.raises(BadRequest):
        extract("POST", MULTIPART, multipart(("model", b"\xff")), {})


def test_scan_multipart_spans_and_close() -> None:
    body = multipart(("a", b"1"), ("model", b"m"), ("file", b"zz", "f"))
    scan = scan_multipart(body, multipart_boundary(MULTIPART), frozenset({b"model", b"a"}))
    assert [(name, body[start:end]) for name, start, end in scan.fields] == [(b"a", b"1"), (b"model", b"m")]
    assert body[scan.close_at :] == f"--{BOUNDARY}--\r\n".encode()
    assert scan.newline == b"\r\n"


def test_multipart_parts_without_a_name_are_skipped() -> None:
    body = (
        f"--{BOUNDARY}\r\n\r\nheaderless\r\n"
        f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nno name\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        f"--{BOUNDARY}--"
    ).encode()
    assert extract("POST", MULTIPART, body, {}).model == "m"


def test_multipart_non_ascii_boundary_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="boundary"):
        extract("POST", "multipart/form-data; boundary=bö", b"--b\r\n", {})


@pytest.mark.parametrize(
    "ctype", ["application/x-www-form-urlencoded", "text/plain;charset=UTF-8", "application/octet-stream"]
)
def test_json_body_under_another_content_type_is_read_as_json(ctype: str) -> None:
    # curl -d '{...}' without -H, or fetch() with a string body: llama-server reads these as JSON.
    got = extract("POST", ctype, b'{"model": "chat-b", "stream": true}', {})
    assert (got.model, got.stream) == ("chat-b", True)


def test_brace_body_that_is_not_json_falls_back_to_the_declared_type() -> None:
    got = extract("POST", "application/x-www-form-urlencoded", b"{x=1&model=m", {})
    assert got.model == "m"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "temperature": NaN, "stream": true}',  # the standard library's extension
        b'{"model": "m", "stop": ["\\ud800"], "stream": true}',  # a lone surrogate
        '{"model": "m", "stream": true}'.encode("utf-16"),  # not UTF-8
        b'{"model": "m", "seed": 123456789012345678901234567890, "stream": true}',
    ],
    ids=["nan", "lone-surrogate", "utf-16", "big-int"],
)
def test_json_the_standard_library_reads_is_read(body: bytes) -> None:
    assert extract("POST", "application/json", body, {}) == RequestModel("m", True)


def test_json_nothing_reads_gets_the_standard_librarys_message() -> None:
    with pytest.raises(BadRequest, match="invalid JSON body: Expecting ',' delimiter"):
        extract("POST", "application/json", b'{"model": "m" "stream": true}', {})
