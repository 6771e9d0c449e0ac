"""The Ray Serve application: one HTTP ingress and the Kafka ingest sharing the same model replicas.

    serve run configs/serve.yaml            # import_path: deployment.app:build_app
    captioner serve [--config FILE]         # the same, locally, with embedded servers resolved

```
             ┌─────────────── CaptionIngress (FastAPI: /v1/captions, /healthz, /readyz) ──┐
HTTP ───────►│                                                                            ├──► CaptionReplica × N
Kafka ──────►└─────────────── KafkaIngest (consumer-group members: workers.pipeline) ─────┘  (GPU-pinned, engine)
```

Settings travel to the deployments as plain data without secrets (`Settings.portable()`); each
process reads secrets from its own environment (Kubernetes Secrets become env variables).

The HTTP ingress is safe to expose (README, "HTTP API"):
- `POST /v1/captions` needs `Authorization: Bearer <token>` when `http.auth: required` (tokens
  from CAPTIONER_HTTP__AUTH_TOKENS or `http.auth_tokens_file`, compared in constant time);
  `auth: disabled` validates only with a loopback `http.host`. `/healthz`, `/readyz`, `/docs` and
  `/openapi.json` are open. A refused token is 401 `unauthorized`, before the body is read.
- At most `http.max_concurrent_requests` captions at once and `http.max_body_bytes_in_flight`
  bytes of bodies per replica; beyond either, 429 `overloaded` with Retry-After, at once.
- JSON `{"image": "s3://…"}` only with `http.allow_s3_references` (else 403 forbidden_reference).
- Never a bare 500: every answer is JSON `{"error": {"code", "message"}}` with a dead-letter code
  (or the HTTP-only `unauthorized` / `overloaded`); anything unexpected is logged and answered
  with the code of the stage it happened in; responses are encoded so that no value can fail.
"""

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployment.http_guard import (
    RETRY_AFTER_S,
    Admission,
    Overloaded,
    SafeJSONResponse,
    bearer_ok,
    ensure_encodable,
    error_response,
    load_tokens,
    read_capped,
)
from workers import metrics
from workers.config import ConfigError, Settings, load_settings
from workers.contract import (
    ErrorCode,
    Rejected,
    describe,
    resolve_params,
    result_record,
)
from workers.contract import Request as CaptionRequest
from workers.replica_api import ReplicaAnswer, ReplicaInfo
from workers.replica_wire import (
    BATCH_PATH,
    INFO_PATH,
    FrameError,
    decode_batch,
    encode_answers,
    encode_info,
)
from workers.replicas import replica_app
from workers.stages import Stages

log = logging.getLogger(__name__)

INGRESS_NAME = "CaptionIngress"
INGEST_NAME = "KafkaIngest"
INGRESS_MAX_ONGOING_CALLS = 64
# Ray/Serve errors that mean "not now" for a batch call: the ingest retries a 503 until it goes.
_NOT_NOW = frozenset(
    {"BackPressureError", "DeploymentUnavailableError", "RayActorError", "ActorDiedError", "ActorUnavailableError"}
)  # configs/serve.yaml may set another value per environment

# Each dead-letter code as an HTTP status: the client's fault is 4xx, ours or upstream's 5xx,
# and nothing the request contains can produce a bare 500.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.FORBIDDEN_REFERENCE: 403,
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.OBJECT_NOT_FOUND: 404,
    ErrorCode.OBJECT_TOO_LARGE: 413,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.INVALID_IMAGE: 422,
    ErrorCode.FETCH_FAILED: 502,
    ErrorCode.INFERENCE_FAILED: 503,
}


# The stage a request is in when something unexpected happens: its code, as the pipeline has it.
UNEXPECTED_CODE = {
    "parse": ErrorCode.INVALID_MESSAGE,
    "fetch": ErrorCode.FETCH_FAILED,
    "decode": ErrorCode.INVALID_IMAGE,
    "inference": ErrorCode.INFERENCE_FAILED,
}


def settings_from_args(args: dict[str, Any]) -> Settings:
    """Serve `args` → Settings: `config_path` (a YAML file) and/or `settings` (nested overrides)."""
    unknown = set(args) - {"config_path", "settings"}
    if unknown:
        raise ConfigError("serve args", [{"loc": (k,), "input": args[k], "msg": "unknown argument"} for k in unknown])
    settings = load_settings(args.get("config_path"), **(args.get("settings") or {}))
    if settings.kafka.embedded or settings.s3.embedded:
        raise ConfigError(
            "serve args",
            [
                {
                    "loc": ("kafka.bootstrap_servers / s3.endpoint_url",),
                    "input": "embedded",
                    "msg": "'embedded' starts servers inside one process; in a Serve application give real "
                    "addresses (`captioner serve` resolves 'embedded' before deploying)",
                }
            ],
        )
    return settings


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder named in configs/serve.yaml: the inference tier only (HTTP API,
    batch endpoint, replicas). The Kafka ingest runs as its own KEDA-scaled pods, so a
    RayService upgrade never reshuffles the consumer group."""
    return application(settings_from_args(args), ingest=False)


def application(settings: Settings, *, ingest: bool = True) -> serve.Application:
    """The Serve app; `ingest=True` (`captioner serve` locally) adds the in-app Kafka ingest."""
    portable = settings.portable()
    replicas = replica_app(settings.model, settings.s3, settings.replicas)
    kafka_ingest = KafkaIngest.bind(portable, replicas) if ingest else None
    return ingress_deployment(settings).bind(portable, replicas, kafka_ingest)


def ingress_deployment(settings: Settings) -> Any:
    """CaptionIngress with Serve's own limits set from ours. The ingress mostly awaits replicas: at
    Serve's default of 5 ongoing calls it would cap how many of the ingest's micro-batches reach
    the replicas, and their batches would never fill; and twice `http.max_concurrent_requests`
    may reach it, so that the excess of `/v1/captions` gets our 429 at once rather than waiting
    in the proxy, with as many again waiting in the proxy before it answers 503."""
    limit = settings.http.max_concurrent_requests
    ongoing = max(INGRESS_MAX_ONGOING_CALLS, 2 * limit)
    return CaptionIngress.options(max_ongoing_requests=ongoing, max_queued_requests=ongoing)


# -- Kafka ingest ------------------------------------------------------------------------------


@serve.deployment(name=INGEST_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0.5})
class KafkaIngest:
    """Consumer-group members inside the application; stopped (drained, committed) with it."""

    def __init__(self, settings: dict[str, Any], replicas: DeploymentHandle):
        self.settings = Settings.from_portable(settings)
        self.replicas = replicas
        self.pipeline: Any = None
        self.error: BaseException | None = None
        metrics.serve_metrics(self.settings.metrics.port, self.settings.metrics.host)
        # The pipeline waits for the model (it sizes images from the replica's spec); start it
        # off the constructor so this replica is healthy while the replicas load.
        threading.Thread(target=self._start, name="ingest-start", daemon=True).start()

    def _start(self) -> None:
        from workers.pipeline import Pipeline

        try:
            self.pipeline = Pipeline(self.settings, self.replicas, name="ingest").start()
        except BaseException as e:
            self.error = e
            log.exception("Kafka ingest failed to start")

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"ingest failed to start: {describe(self.error)}")
        if self.pipeline is not None and self.pipeline.failed.is_set():
            raise RuntimeError("ingest stopped: the broker did not acknowledge an outcome")

    def status(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "running": p is not None and not p.stopping,
            "in_flight": p.window.count if p else 0,
            "assignment": sorted(f"{tp.topic}:{tp.partition}" for s in (p.sources if p else []) for tp in s.assignment),
        }

    def __del__(self) -> None:
        # Serve calls __del__ on graceful shutdown: drain in-flight records and commit.
        if self.pipeline is not None:
            self.pipeline.stop()


# -- HTTP ingress ---------------------------------------------------------------------------
# (Helpers first: the ingress class is shipped to its replicas by value, with the globals it
# finds defined at that point.)


async def _upload(request: Request, body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """A raw image body (fields from the query string) or a multipart form with field `image`."""
    fields = dict(request.query_params)
    if content_type != "multipart/form-data":
        return body, fields
    from starlette.formparsers import MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_part_size=len(body) + 1).parse()
    except Exception as e:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"malformed multipart body: {e}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise Rejected(ErrorCode.INVALID_MESSAGE, "multipart body needs a file field 'image'")
    data = await upload.read()
    fields.update({k: v for k, v in form.items() if isinstance(v, str)})
    fields.setdefault("filename", upload.filename or "upload")
    return data, fields


def _upload_request(data: bytes, fields: dict[str, str], settings: Settings) -> CaptionRequest:
    """The request an upload stands for: id, params and metadata from its fields."""
    try:
        overrides = json.loads(fields["params"]) if fields.get("params") else {}
        metadata = json.loads(fields["metadata"]) if fields.get("metadata") else {}
    except json.JSONDecodeError as e:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"params/metadata must be JSON: {e.msg}") from None
    if not isinstance(overrides, dict) or not isinstance(metadata, dict):
        raise Rejected(ErrorCode.INVALID_MESSAGE, "params and metadata must be JSON objects")
    name = fields.get("filename") or "upload"
    digest = hashlib.sha256(data).hexdigest()[:16]
    return CaptionRequest(
        id=fields.get("id") or f"upload:{digest}",
        image=f"upload:{name}",
        params=resolve_params(settings.generation, overrides, settings.limits),
        metadata=metadata,
    )


class _Progress:
    """Which stage an HTTP request has reached, for the code of an unexpected error."""

    stage: str = "parse"


api = FastAPI(
    title="captioner",
    version="0.1.0",
    description="Image captioning with ViT-GPT2. POST an image (raw body or multipart field `image`) "
    'or JSON {"image": "s3://…", "params": {…}}; the answer has the results topic\'s schema.',
)


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class CaptionIngress:
    def __init__(self, settings: dict[str, Any], replicas: DeploymentHandle, ingest: DeploymentHandle | None = None):
        from workers.fetch import Fetcher
        from workers.s3 import make_s3_client

        self.settings = Settings.from_portable(settings)
        http = self.settings.http
        self.replicas = replicas
        self.ingest = ingest
        self.tokens = load_tokens(self.settings)
        if http.auth == "required" and not self.tokens:
            raise ConfigError(
                "http auth",
                [
                    {
                        "loc": ("http", "auth_tokens"),
                        "input": None,
                        "msg": "http.auth is 'required' but no token is configured: set "
                        "CAPTIONER_HTTP__AUTH_TOKENS or http.auth_tokens_file",
                    }
                ],
            )
        self.admission = Admission(http.max_concurrent_requests, http.max_body_bytes_in_flight)
        self.fetcher = Fetcher(make_s3_client(self.settings.s3), self.settings.s3, self.settings.limits)
        self._model_info: ReplicaInfo | None = None
        self.stages = Stages(self.settings, self.fetcher)  # sized once a replica's model is known

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready once a replica has its model loaded."""
        try:
            ready = await asyncio.wait_for(self.replicas.ready.remote(), timeout=5)
            info = await self._info() if ready else None
        except Exception as e:  # no replica yet, or one that is still starting
            ready, info = False, None
            log.debug("readiness probe: %s", type(e).__name__)
        if not ready or info is None:
            return JSONResponse({"ready": False}, status_code=503)
        return SafeJSONResponse({"ready": True, "model": info.model})

    @api.post("/v1/captions")
    async def caption(self, request: Request) -> JSONResponse:
        """Auth, then admission, then the stages; every way out is JSON with a code."""
        if not self._authorized(request):
            return error_response(
                "unauthorized", "missing or invalid bearer token", 401, {"WWW-Authenticate": "Bearer"}
            )
        progress = _Progress()
        try:
            with self.admission.request() as allowance:
                body = await read_capped(request, self.settings.limits.max_http_body_bytes, allowance)
                return SafeJSONResponse(await self._caption(request, body, progress))
        except Overloaded as e:
            metrics.HTTP_REJECTED.labels("overloaded").inc()
            return error_response("overloaded", str(e), 429, {"Retry-After": RETRY_AFTER_S})
        except Rejected as e:
            return error_response(str(e.code), e.message, HTTP_STATUS[e.code])
        except Exception as e:  # ours, not the caller's: logged, answered with the stage's code
            code = UNEXPECTED_CODE[progress.stage]
            log.exception("unexpected error in the %s stage of an HTTP request", progress.stage)
            return error_response(str(code), describe(e), HTTP_STATUS[code])

    def _authorized(self, request: Request) -> bool:
        """Bearer token check (constant time) for everything but health, readiness and the docs."""
        if self.settings.http.auth != "required" or bearer_ok(request.headers.get("authorization"), self.tokens):
            return True
        metrics.HTTP_REJECTED.labels("unauthorized").inc()
        return False

    # -- the way through, as in the worker: parse → fetch → decode → replicas --------------------

    async def _caption(self, request: Request, body: bytes, progress: _Progress) -> dict[str, Any]:
        settings = self.settings
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        timings: dict[str, float] = {}
        if content_type == "application/json":
            req = self.stages.parse(body)
            ensure_encodable(req)
            if not settings.http.allow_s3_references:
                raise Rejected(
                    ErrorCode.FORBIDDEN_REFERENCE,
                    "s3:// references are not accepted over HTTP here (http.allow_s3_references)",
                )
            progress.stage = "fetch"
            data = (await asyncio.to_thread(self.stages.fetch, req.image, timings)).data
        else:
            data, fields = await _upload(request, body, content_type)
            req = _upload_request(data, fields, settings)
            ensure_encodable(req)
        progress.stage = "inference"
        info = await self._info()
        if self.stages.input_size is None:
            self.stages = self.stages.sized(info.input_size)
        progress.stage = "decode"
        prepared = await asyncio.to_thread(self.stages.decode, data, timings)
        progress.stage = "inference"
        try:
            answer: ReplicaAnswer = await self.replicas.caption.remote(prepared.pixels, req.params)
        except Exception as e:
            raise Rejected(ErrorCode.INFERENCE_FAILED, describe(e)) from None
        timings["inference"] = answer.inference_ms
        return result_record(
            req,
            captions=answer.captions,
            model=info.model,
            cached=False,
            width=prepared.width,
            height=prepared.height,
            timings_ms=timings,
            scores=answer.scores,
        )

    async def _info(self) -> ReplicaInfo:
        if self._model_info is None:
            try:
                self._model_info = await self.replicas.info.remote()
            except Exception as e:
                raise Rejected(ErrorCode.INFERENCE_FAILED, f"no model replica answered: {describe(e)}") from None
        return self._model_info

    # -- the inference tier's batch endpoint: what `captioner run` ingest pods call ---------------

    @api.post(BATCH_PATH, summary="Caption many prepared images (the ingest's micro-batches)")
    async def replica_batch(self, request: Request) -> Response:
        """A frame of uint8 images at the model's size (workers/replica_wire.py) → their answers.

        A failed generate is an answer's `error` (200); anything that says "not now" — Serve's
        backpressure (`replicas.max_queued_requests`), a replica that died under the call, no
        replica yet — is 503 with Retry-After, which the ingest retries and never dead-letters.
        """
        if not self._authorized(request):
            return error_response(
                "unauthorized", "missing or invalid bearer token", 401, {"WWW-Authenticate": "Bearer"}
            )
        try:
            # The same admission as /v1/captions: over it, a 503 the ingest retries (backpressure).
            with self.admission.request() as allowance:
                body = await read_capped(request, self.settings.limits.max_http_body_bytes, allowance)
                items = decode_batch(body, max_items=self.settings.replicas.max_batch_size * 4)
                answers = await self.replicas.caption_many.remote(items)
        except FrameError as e:
            return error_response("invalid_message", str(e), 400)
        except Rejected as e:
            return error_response(str(e.code), e.message, HTTP_STATUS[e.code])
        except Overloaded as e:
            metrics.HTTP_REJECTED.labels("overloaded").inc()
            return error_response("unavailable", str(e), 503, {"Retry-After": "1"})
        except Exception as e:
            if type(e).__name__ in _NOT_NOW:  # backpressure, a replica that died, none started yet
                log.warning("batch not taken: %s", describe(e))
                return error_response("unavailable", describe(e), 503, {"Retry-After": "1"})
            # Anything else failed in the replica itself: each image gets it in-band (its dead
            # letter says why) instead of a 503 the ingest would retry for ever.
            log.exception("replica call failed for a batch")
            answers = [ReplicaAnswer([], None, len(items), 0.0, error=describe(e)) for _ in items]
        return SafeJSONResponse(encode_answers(answers))

    @api.get(INFO_PATH, summary="The replicas' model identity and input size")
    async def replica_info(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return error_response(
                "unauthorized", "missing or invalid bearer token", 401, {"WWW-Authenticate": "Bearer"}
            )
        try:
            info = await asyncio.wait_for(self._info(), timeout=30)
        except Exception as e:  # the model is still loading, or failed to
            return error_response("unavailable", describe(e), 503, {"Retry-After": "5"})
        return SafeJSONResponse(encode_info(info))
