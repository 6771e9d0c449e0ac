"""Parsing requests and building outcome records: the message contract, without I/O."""

import base64
import json

import pytest

from workers.config import LimitsConfig
from workers.contract import (
    MAX_ECHO_BYTES,
    ErrorCode,
    Rejected,
    Source,
    dead_letter_record,
    parse_request,
    result_record,
)
from workers.params import GenerationParams
from workers.s3 import parse_image_ref

DEFAULTS = GenerationParams()
LIMITS = LimitsConfig(max_message_bytes=1000)
SRC = Source("images", 2, 41)


def parse(value, **kw):
    return parse_request(value, defaults=DEFAULTS, limits=LIMITS, source=SRC, **kw)


def test_full_request_and_bare_reference():
    req = parse(
        json.dumps({"id": "a", "image": "s3://images/x.jpg", "params": {"beam_size": 4}, "metadata": {"k": 1}}).encode()
    )
    assert (req.id, req.image, req.params.beam_size, req.metadata) == ("a", "s3://images/x.jpg", 4, {"k": 1})
    assert req.params.max_output_length == DEFAULTS.max_output_length
    bare = parse(b"s3://images/y.jpg")
    assert bare.id == "s3://images/y.jpg" and bare.metadata == {} and bare.params == DEFAULTS
    quoted = parse(b'"s3://images/z.jpg"')
    assert quoted.image == "s3://images/z.jpg"


@pytest.mark.parametrize(
    "value, fragment",
    [
        (None, "tombstone"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"id": "x"}', "'image'"),
        (b'{"image": 5}', "'image'"),
        (b'{"image": "s3://images/a", "id": 3}', "'id'"),
        (b'{"image": "s3://images/a", "params": []}', "'params'"),
        (b'{"image": "s3://images/a", "metadata": "x"}', "'metadata'"),
        (b'{"image": "s3://images/a", "extra": 1}', "unknown field"),
        (b'{"image": "s3://images/a", "params": {"beam_size": 0}}', "beam_size"),
        (b'{"image": "s3://images/a", "params": {"beam_size": 99}}', "max_beam_size"),
        (b'{"image": "s3://images/a", "params": {"bogus": 1}}', "bogus"),
        (b"x" * 1001, "max_message_bytes"),
    ],
)
def test_invalid_messages_say_what_is_wrong(value, fragment):
    with pytest.raises(Rejected) as e:
        parse(value)
    assert e.value.code is ErrorCode.INVALID_MESSAGE
    assert fragment in e.value.message


@pytest.mark.parametrize(
    "uri",
    [
        "http://images/a.jpg",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "s3://other/a.jpg",
        "s3://images/",
        "s3://images",
        "s3:///a.jpg",
        "s3://images/../secret/a.jpg",
        "s3://images/a/../../b.jpg",
        "s3://IMAGES/a.jpg",  # bucket names are case-sensitive
    ],
)
def test_forbidden_references(uri):
    with pytest.raises(Rejected) as e:
        parse_image_ref(uri, ["images"])
    assert e.value.code is ErrorCode.FORBIDDEN_REFERENCE


def test_scheme_is_case_insensitive_and_star_allows_any_bucket():
    assert parse_image_ref("S3://images/a/b.jpg", ["images"]).key == "a/b.jpg"
    assert parse_image_ref("s3://anything/k.png", ["*"]).bucket == "anything"


def test_result_record_fields():
    req = parse(b'{"id": "a", "image": "s3://images/x.jpg", "params": {"n_return_sequences": 2}}')
    rec = result_record(
        req,
        captions=["one", "two"],
        model={"name": "m", "backend": "torch", "untrained": True},
        cached=False,
        width=640,
        height=480,
        timings_ms={"fetch": 1.23456},
    )
    assert rec["caption"] == "one" and rec["captions"] == ["one", "two"]
    assert rec["params"]["n_return_sequences"] == 2 and rec["params"]["beam_size"] == 2
    assert rec["source"] == {"topic": "images", "partition": 2, "offset": 41}
    assert rec["metadata"] == {} and rec["model"]["untrained"] is True
    assert rec["timings_ms"] == {"fetch": 1.235}
    single = result_record(
        parse(b"s3://images/x.jpg"), captions=["c"], model={}, cached=True, width=1, height=1, timings_ms={}
    )
    assert "captions" not in single and single["cached"] is True


def test_dead_letter_echoes_text_binary_and_truncates():
    text = dead_letter_record(code=ErrorCode.INVALID_MESSAGE, message="m", value=b"{bad", source=SRC, attempts=1)
    assert text["request"] == "{bad" and text["request_encoding"] == "utf-8"
    assert text["error"] == {"code": "invalid_message", "message": "m"}
    binary = dead_letter_record(code=ErrorCode.INVALID_MESSAGE, message="m", value=b"\xff\x00", source=SRC, attempts=1)
    assert base64.b64decode(binary["request"]) == b"\xff\x00" and binary["request_encoding"] == "base64"
    big = dead_letter_record(
        code=ErrorCode.INVALID_MESSAGE, message="m", value=b"a" * (MAX_ECHO_BYTES + 5), source=SRC, attempts=1
    )
    assert big["request_truncated"] is True and len(big["request"]) == MAX_ECHO_BYTES
    tomb = dead_letter_record(code=ErrorCode.INVALID_MESSAGE, message="m", value=None, source=SRC, attempts=1)
    assert tomb["request"] is None
