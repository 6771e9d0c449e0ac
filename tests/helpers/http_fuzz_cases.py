"""Malformed and hostile HTTP requests for the ingress (tests/test_deployment.py), from a seed.

Each case is a request that must get a 4xx with an error code, never a 500 and never a caption:
bodies (random bytes, truncated JSON, lone surrogates, NaN/Infinity, huge numbers, deep
nesting, wrong types), headers (content types, content lengths, multipart boundaries) and auth
(missing, wrong, malformed tokens). `raw` cases are written to the socket as bytes, for what an
HTTP client library refuses to send.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import dataclass, field


@dataclass
class Case:
    name: str
    body: bytes = b""
    headers: dict[str, str | bytes] = field(default_factory=dict)
    query: str = ""
    raw: bytes | None = None  # a whole HTTP request, sent as is
    expect_status: int | None = None  # where the exact answer is known
    expect_code: str | None = None
    authorised: bool = True  # send the valid bearer token
    # Control characters in a header: the HTTP server may refuse the request (plain-text 400)
    # before the application sees it. `raw` cases may too.
    protocol: bool = False


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _json_cases(rng: random.Random, bucket: str) -> list[Case]:
    ct = {"content-type": "application/json"}
    valid = json.dumps(
        {"id": "fuzz", "image": f"s3://{bucket}/x.png", "params": {"beam_size": 1}, "metadata": {"k": "v"}}
    ).encode()
    cases = [Case(f"json random bytes {i}", rng.randbytes(rng.randint(0, 300)), ct) for i in range(50)]
    cases += [Case(f"json truncated at {n}", valid[:n], ct) for n in sorted(rng.sample(range(len(valid) - 1), 25))]
    surrogate = "\\ud800"
    for where in ("id", "image", "metadata value", "metadata key", "params key", "params value"):
        for variant in ("lone", "pair-less low", "raw bytes"):
            escape = {"lone": surrogate, "pair-less low": "\\udfff", "raw bytes": None}[variant]
            text = {
                "id": '{"id": "%s", "image": "s3://%s/x.png"}',
                "image": '{"image": "s3://%s/x%s.png"}',
                "metadata value": '{"image": "s3://%s/x.png", "metadata": {"k": "%s"}}',
                "metadata key": '{"image": "s3://%s/x.png", "metadata": {"%s": 1}}',
                "params key": '{"image": "s3://%s/x.png", "params": {"%s": 1}}',
                "params value": '{"image": "s3://%s/x.png", "params": {"beam_size": "%s"}}',
            }[where]
            args = (escape or "@@", bucket) if where == "id" else (bucket, escape or "@@")
            body = (text % args).encode()
            if escape is None:
                body = body.replace(b"@@", b"\xed\xa0\x80")  # UTF-8 bytes of U+D800: not valid UTF-8
            cases.append(Case(f"json surrogate {variant} in {where}", body, ct))
    image = f'"image": "s3://{bucket}/x.png"'
    for value in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999"):
        for where in ("temperature", "top_p", "repetition_penalty"):
            cases.append(
                Case(f"json {value} in params.{where}", f'{{{image}, "params": {{"{where}": {value}}}}}'.encode(), ct)
            )
        cases.append(Case(f"json {value} in metadata", f'{{{image}, "metadata": {{"x": {value}}}}}'.encode(), ct))
    for digits in (30, 5000, 20000):
        cases.append(
            Case(
                f"json {digits}-digit beam_size",
                f'{{{image}, "params": {{"beam_size": 1{"0" * digits}}}}}'.encode(),
                ct,
            )
        )
    for depth in (100, 1000, 100_000):
        cases.append(
            Case(
                f"json nested {depth} deep in metadata",
                f'{{{image}, "metadata": {{"x": {"[" * depth}{"]" * depth}}}}}'.encode(),
                ct,
            )
        )
        cases.append(Case(f"json top level nested {depth} deep", ("[" * depth + "]" * depth).encode(), ct))
    wrong = [
        {"image": 5},
        {"image": None},
        {"image": []},
        {"image": {}},
        {"id": [], "image": f"s3://{bucket}/x.png"},
        {"id": {}, "image": f"s3://{bucket}/x.png"},
        {"image": f"s3://{bucket}/x.png", "params": "x"},
        {"image": f"s3://{bucket}/x.png", "params": []},
        {"image": f"s3://{bucket}/x.png", "params": 5},
        {"image": f"s3://{bucket}/x.png", "metadata": "x"},
        {"image": f"s3://{bucket}/x.png", "metadata": [1]},
        {"image": f"s3://{bucket}/x.png", "params": {"beam_size": "two"}},
        {"image": f"s3://{bucket}/x.png", "unknown": 1},
        5,
        "s3-but-a-string",
        None,
        [],
        True,
        {},
    ]
    cases += [
        Case(f"json wrong types {i}: {json.dumps(v)[:40]}", json.dumps(v).encode(), ct) for i, v in enumerate(wrong)
    ]
    cases += [
        Case(f"json utf-16 {i}", json.dumps({"image": f"s3://{bucket}/{i}.png"}).encode("utf-16"), ct) for i in range(2)
    ]
    cases.append(Case("json BOM then garbage", b"\xef\xbb\xbf{nope", ct))
    # Well-formed references, refused because this ingress does not take them over HTTP.
    for i, ref in enumerate(
        [f"s3://{bucket}/x.png", f"S3://{bucket}/y.jpg", "s3://elsewhere/z.png", f"s3://{bucket}/../etc"]
    ):
        cases.append(
            Case(
                f"json s3 reference {i}",
                json.dumps({"image": ref}).encode(),
                ct,
                expect_status=403,
                expect_code="forbidden_reference",
            )
        )
    return cases


def _upload_cases(rng: random.Random) -> list[Case]:
    types_ = [
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "text/plain",
        "",
        "image/png; charset=\x01",
        "x" * 5000,
        "application/x-www-form-urlencoded",
        "image/*",
        "application/jsonx",
    ]
    cases = [
        Case(
            f"upload random bytes as {t[:30]!r} {i}",
            rng.randbytes(rng.randint(1, 2000)),
            {"content-type": t},
            protocol="\x01" in t,
        )
        for i in range(5)
        for t in types_
    ]
    cases.append(Case("upload empty body", b"", {"content-type": "image/png"}))
    cases.append(Case("upload PNG signature only", b"\x89PNG\r\n\x1a\n", {"content-type": "image/png"}))
    cases.append(Case("upload JPEG SOI only", b"\xff\xd8\xff\xe0", {"content-type": "image/jpeg"}))
    cases.append(
        Case(
            "upload PNG header declaring 100000 x 100000",
            _png_header(100_000, 100_000),
            {"content-type": "image/png"},
            expect_status=413,
            expect_code="image_too_large",
        )
    )
    cases.append(Case("upload PNG header declaring 0 x 0", _png_header(0, 0), {"content-type": "image/png"}))
    png = _png_header(8, 8)
    for i, query in enumerate(
        [
            "params=%7Bbad",
            "params=%5B1%5D",
            "metadata=NaN",
            "metadata=%5B1%5D",
            "params=%7B%22temperature%22%3AInfinity%7D",
            "params=%7B%22beam_size%22%3A1e999%7D",
            "id=%ED%A0%80",
            "metadata=%7B%22k%22%3A%22%5Cud800%22%7D",
            "params=%7B%22beam_size%22%3A0%7D",
            "params=%7B%22nope%22%3A1%7D",
        ]
    ):
        cases.append(Case(f"upload query {i}: {query[:40]}", png, {"content-type": "image/png"}, query=query))
    return cases


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]], close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def _multipart_cases(rng: random.Random) -> list[Case]:
    png = _png_header(8, 8)
    good = _multipart("b0undary", [("image", "x.png", rng.randbytes(64))])
    ct = "multipart/form-data; boundary=b0undary"
    cases = [
        Case("multipart without boundary", good, {"content-type": "multipart/form-data"}),
        Case("multipart empty boundary", good, {"content-type": "multipart/form-data; boundary="}),
        Case("multipart wrong boundary", good, {"content-type": "multipart/form-data; boundary=other"}),
        Case("multipart quoted boundary mismatch", good, {"content-type": 'multipart/form-data; boundary="b0und"'}),
        Case(
            "multipart 200-char boundary",
            _multipart("b" * 200, [("image", "x.png", png)]),
            {"content-type": "multipart/form-data; boundary=" + "b" * 200},
        ),
        Case("multipart body is not multipart", rng.randbytes(300), {"content-type": ct}),
        Case("multipart no image field", _multipart("b0undary", [("other", "x.png", png)]), {"content-type": ct}),
        Case(
            "multipart image as a text field",
            _multipart("b0undary", [("image", None, b"s3://images/x.png")]),
            {"content-type": ct},
        ),
        Case(
            "multipart unterminated",
            _multipart("b0undary", [("image", "x.png", png)], close=False),
            {"content-type": ct},
        ),
        Case(
            "multipart garbage part headers",
            b"--b0undary\r\nNot-A-Header\r\n\r\nx\r\n--b0undary--\r\n",
            {"content-type": ct},
        ),
        Case(
            "multipart CRLF in filename",
            _multipart("b0undary", [("image", "a\r\nX-Evil: 1", png)]),
            {"content-type": ct},
        ),
        Case(
            "multipart 2000 fields",
            _multipart("b0undary", [(f"f{i}", None, b"v") for i in range(2000)]),
            {"content-type": ct},
        ),
        Case(
            "multipart 2000 files",
            _multipart("b0undary", [(f"f{i}", "x", b"v") for i in range(2000)]),
            {"content-type": ct},
        ),
    ]
    for i, (name, value) in enumerate(
        [
            ("params", b"{bad"),
            ("params", b"NaN"),
            ("params", b'{"temperature": Infinity}'),
            ("params", b"[1]"),
            ("metadata", b'{"k": "\\ud800"}'),
            ("metadata", b'{"x": NaN}'),
            ("metadata", b"[" * 50_000 + b"]" * 50_000),
            ("params", b'{"beam_size": 1' + b"0" * 5000 + b"}"),
            ("id", b"\xed\xa0\x80"),
            ("params", b"\xff\xfe"),
        ]
    ):
        body = _multipart("b0undary", [("image", "x.png", png), (name, None, value)])
        cases.append(Case(f"multipart field {i}: {name}={value[:20]!r}", body, {"content-type": ct}))
    cases += [
        Case(
            f"multipart random image bytes {i}",
            _multipart("b0undary", [("image", "x.png", rng.randbytes(500))]),
            {"content-type": ct},
        )
        for i in range(10)
    ]
    return cases


def _auth_cases(token: str, bucket: str) -> list[Case]:
    body = json.dumps({"image": f"s3://{bucket}/x.png"}).encode()
    headers: list[tuple[str, str | bytes | None]] = [
        ("missing", None),
        ("empty", ""),
        ("scheme only", "Bearer"),
        ("scheme and space", "Bearer "),
        ("wrong token", "Bearer " + "x" * len(token)),
        ("basic", "Basic dXNlcjpwYXNz"),
        ("token with suffix", f"Bearer {token}x"),
        ("token prefix", f"Bearer {token[:-1]}"),
        ("no scheme", token),
        ("other scheme", f"Token {token}"),
        ("8 KB token", "Bearer " + "a" * 8192),
        ("non-latin-1 bytes", b"Bearer \xff\xfe\xfd"),
        ("token twice", f"Bearer {token} {token}"),
        ("NUL inside", f"Bearer {token[:4]}\x01{token[4:]}"),
        ("lower-case wrong", "bearer nope-nope-nope-nope"),
    ]
    cases = []
    for name, value in headers:
        for kind, data, ct in (("json", body, "application/json"), ("upload", _png_header(8, 8), "image/png")):
            h: dict[str, str | bytes] = {"content-type": ct}
            if value is not None:
                h["authorization"] = value
            cases.append(
                Case(
                    f"auth {name} ({kind})",
                    data,
                    h,
                    authorised=False,
                    expect_status=401,
                    expect_code="unauthorized",
                    protocol=name == "NUL inside",
                )
            )
    cases.append(
        Case(
            "auth token in the query string",
            body,
            {"content-type": "application/json"},
            query=f"access_token={token}",
            authorised=False,
            expect_status=401,
            expect_code="unauthorized",
        )
    )
    return cases


def _raw_cases(path: str, token: str) -> list[Case]:
    def request(headers: str, body: bytes = b"") -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Connection: close\r\n{headers}\r\n"
        ).encode() + body

    png = _png_header(8, 8)
    cases = [
        Case("raw content-length not a number", raw=request("Content-Type: image/png\r\nContent-Length: abc\r\n", png)),
        Case("raw content-length negative", raw=request("Content-Type: image/png\r\nContent-Length: -5\r\n", png)),
        Case(
            "raw content-length huge",
            raw=request("Content-Type: image/png\r\nContent-Length: 99999999999999999999999\r\n", png),
        ),
        Case("raw content-length list", raw=request("Content-Type: image/png\r\nContent-Length: 10, 20\r\n", png)),
        Case(
            "raw two content-lengths",
            raw=request(f"Content-Type: image/png\r\nContent-Length: {len(png)}\r\nContent-Length: 3\r\n", png),
        ),
        Case(
            "raw content-length over the limit",
            raw=request("Content-Type: image/png\r\nContent-Length: 999999999\r\n"),
            expect_status=413,
            expect_code="object_too_large",
        ),
        Case(
            "raw bad chunk size",
            raw=request("Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
        ),
        Case(
            "raw chunked and content-length",
            raw=request(
                f"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\nContent-Length: {len(png)}\r\n", b"0\r\n\r\n"
            ),
        ),
        Case(
            "raw chunked random image",
            raw=request("Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n", b"5\r\nabcde\r\n0\r\n\r\n"),
        ),
        Case(
            "raw content-type with NUL",
            raw=request(f"Content-Type: image/\x00png\r\nContent-Length: {len(png)}\r\n", png),
        ),
        Case("raw header without colon", raw=request(f"Content-Type image/png\r\nContent-Length: {len(png)}\r\n", png)),
        Case(
            "raw obs-fold header",
            raw=request(f"Content-Type: image/png\r\n continued\r\nContent-Length: {len(png)}\r\n", png),
        ),
    ]
    for case in cases:
        case.protocol = True
    return cases


def fuzz_cases(seed: int, token: str, bucket: str, path: str) -> list[Case]:
    rng = random.Random(seed)
    return (
        _json_cases(rng, bucket)
        + _upload_cases(rng)
        + _multipart_cases(rng)
        + _auth_cases(token, bucket)
        + _raw_cases(path, token)
    )
