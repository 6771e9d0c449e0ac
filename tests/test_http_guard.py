"""deployment.http_guard and the http settings: tokens, admission, encoding (no Serve; the guarded
ingress itself is exercised end to end in tests/test_deployment.py)."""

from __future__ import annotations

import json

import pytest

from deployment.http_guard import (
    Admission,
    Overloaded,
    SafeJSONResponse,
    bearer_ok,
    load_tokens,
)
from workers.config import ConfigError, HttpConfig, Settings, load_settings

TOKEN = "a-token-of-enough-length"


def test_bearer_matches_any_configured_token_and_nothing_else() -> None:
    tokens = [TOKEN.encode(), b"second-token-0123456789"]
    assert bearer_ok(f"Bearer {TOKEN}", tokens) and bearer_ok("bearer second-token-0123456789", tokens)
    for header in (
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        TOKEN,
        "Bearer \xff\xfe",
        f"Token {TOKEN}",
    ):
        assert not bearer_ok(header, tokens), header
    assert not bearer_ok(f"Bearer {TOKEN}", [])  # no token configured: nothing passes


def test_tokens_from_environment_and_file_never_from_yaml(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAPTIONER_HTTP__AUTH_TOKENS", json.dumps([TOKEN]))
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# comment\n\nfile-token-0123456789\n")
    shipped = Settings(http=HttpConfig(auth="required", auth_tokens_file=tokens_file)).portable()
    assert "auth_tokens" not in shipped["http"]  # not shipped to other processes...
    settings = Settings.from_portable(shipped)  # ...each reads its own environment
    assert load_tokens(settings) == [TOKEN.encode(), b"file-token-0123456789"]
    assert TOKEN not in repr(settings)
    config = tmp_path / "c.yaml"
    config.write_text(f"http:\n  auth_tokens: ['{TOKEN}']\n")
    with pytest.raises(ConfigError, match="only from the environment") as err:
        load_settings(config)
    assert TOKEN not in str(err.value)


def test_environment_tokens_as_json_list_or_comma_separated(monkeypatch) -> None:
    for value in (f'["{TOKEN}", "second-token-0123456789"]', f"{TOKEN}, second-token-0123456789"):
        monkeypatch.setenv("CAPTIONER_HTTP__AUTH_TOKENS", value)
        assert load_tokens(load_settings()) == [TOKEN.encode(), b"second-token-0123456789"]


def test_short_tokens_are_refused_without_echoing_them(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CAPTIONER_HTTP__AUTH_TOKENS", json.dumps(["short-secret"]))
    with pytest.raises(ConfigError, match="16 characters") as err:
        load_settings()
    assert "short-secret" not in str(err.value)
    monkeypatch.delenv("CAPTIONER_HTTP__AUTH_TOKENS")
    (tmp_path / "t").write_text("tiny\n")
    with pytest.raises(ConfigError, match="16 characters"):
        load_tokens(Settings(http=HttpConfig(auth_tokens_file=tmp_path / "t")))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "example.com"])
def test_auth_may_be_disabled_only_on_loopback(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(http={"host": host, "auth": "disabled"})
    assert load_settings(http={"host": host, "auth": "required"}).http.auth == "required"
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert load_settings(http={"host": loopback}).http.auth == "disabled"


def test_admission_limits_requests_and_body_bytes() -> None:
    admission = Admission(max_requests=2, max_body_bytes=100)
    with admission.request() as first, admission.request() as second:
        with pytest.raises(Overloaded, match="max_concurrent_requests"), admission.request():
            pass
        first.grow_to(60)
        with pytest.raises(Overloaded, match="max_body_bytes_in_flight"):
            second.grow_to(50)
        second.grow_to(40)
        assert admission.body_bytes == 100
    assert (admission.requests, admission.body_bytes) == (0, 0)  # all given back, error or not


def test_a_body_bigger_than_the_whole_budget_is_admitted_alone() -> None:
    admission = Admission(max_requests=4, max_body_bytes=100)
    with admission.request() as big:
        big.grow_to(500)  # alone: it has the budget to itself
        with admission.request() as small, pytest.raises(Overloaded):
            small.grow_to(1)
    with admission.request() as small, admission.request() as big:
        small.grow_to(1)
        with pytest.raises(Overloaded):
            big.grow_to(500)
    assert admission.body_bytes == 0


def test_answers_cannot_fail_to_encode() -> None:
    body = SafeJSONResponse({"id": "\ud800", "scores": [float("nan"), float("-inf"), 1.5], "é": "ü"}).body
    assert json.loads(body) == {"id": "\ud800", "scores": [None, None, 1.5], "é": "ü"}
    body.decode("ascii")  # every non-ASCII character escaped: no encoder can choke on it
