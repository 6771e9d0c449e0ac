"""The `http` section of the settings: the HTTP API's bind address, bearer tokens and admission
limits (see deployment/http_guard.py). Tokens are secrets: from the environment
(CAPTIONER_HTTP__AUTH_TOKENS) or a mounted file only, never the YAML file, never logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

MB = 1024 * 1024


class Section(BaseModel):
    """A settings section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class HttpConfig(Section):
    host: str = Field("127.0.0.1", description="the address the HTTP proxy binds (Serve's http_options.host)")
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    auth: Literal["required", "disabled"] = Field(
        "disabled", description="bearer tokens on /v1/*; 'disabled' only with a loopback host (local mode)"
    )
    # Secret: CAPTIONER_HTTP__AUTH_TOKENS (a JSON list or comma-separated) in the environment only.
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    auth_tokens_file: Path | None = Field(None, description="one token per line (a mounted Secret)")
    allow_s3_references: bool = Field(False, description='JSON {"image": "s3://…"} bodies over HTTP')
    max_concurrent_requests: int = Field(32, ge=1, description="per ingress replica; more get 429")
    max_body_bytes_in_flight: int = Field(
        128 * MB, ge=1, description="request bodies held at once per ingress replica; more get 429"
    )

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _token_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment: '["a","b"]' or 'a,b'
            try:
                v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
            except ValueError:
                raise ValueError("must be a JSON list of strings or comma-separated") from None
            return [t.strip() for t in v if isinstance(t, str) and t.strip()] if isinstance(v, list) else v
        return v

    @field_validator("auth_tokens")
    @classmethod
    def _tokens_are_strong(cls, v: list[SecretStr]) -> list[SecretStr]:
        if any(len(t.get_secret_value()) < 16 for t in v):
            raise ValueError("each token must be at least 16 characters")
        return v

    def token_strings(self) -> list[str]:
        """Every accepted bearer token: the environment's, then the mounted file's lines. The
        inference tier checks them; an ingest pod sends the first (the tiers share the Secret)."""
        tokens = [t.get_secret_value() for t in self.auth_tokens]
        if self.auth_tokens_file is not None:
            lines = Path(self.auth_tokens_file).read_text().splitlines()
            tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return tokens

    @model_validator(mode="after")
    def _auth_off_only_locally(self) -> HttpConfig:
        if self.auth == "disabled" and self.host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"auth 'disabled' is only allowed when http.host is a loopback address, not {self.host!r}: "
                "set http.auth: required and give tokens (CAPTIONER_HTTP__AUTH_TOKENS or http.auth_tokens_file)"
            )
        return self
