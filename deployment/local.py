"""The Serve application on this machine: `captioner serve` (HTTP ingress + Kafka ingest +
replicas, with `embedded` servers resolved first), and the local inference tier that
`captioner run` and `demo` call over loopback HTTP when no `replicas.endpoint` is set.

Lives beside the application it deploys: `deployment` may import the runtime (`workers`), never
the reverse. Stopping (SIGTERM, SIGINT): the application is deleted first, so the HTTP proxy
stops taking requests and the ingest drains and commits (Serve calls each replica's `__del__`
within its graceful-shutdown timeout); then Serve and the local Ray shut down and the embedded
servers stop; exit 0. A signal while starting unwinds the same way (`workers.signals`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from workers.config import Settings
from workers.runner import console, local_replica_settings, start_ray, start_serve
from workers.signals import Stopped, on_stop_signals, raise_on_stop_signals


def serve_http(settings: Settings) -> int:
    raise_on_stop_signals()
    try:
        return _serve(settings)
    except Stopped as e:
        console.print(f"[yellow]{e} while starting: stopped what had started[/]")
        return 0


def _serve(settings: Settings) -> int:
    from ray import serve

    from deployment.app import application
    from workers.embedded import resolve_embedded
    from workers.kafkaclient import ensure_topics

    with resolve_embedded(settings) as embedded:
        resolved = embedded.settings
        kafka = resolved.kafka
        ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic])
        start_ray(resolved.ray)
        import ray

        try:
            start_serve(resolved, http=True)
            serve.run(application(resolved), name=resolved.ray.app_name, route_prefix=resolved.http.route_prefix)
            stop = threading.Event()
            on_stop_signals(stop.set)
            url = f"http://{resolved.http.host}:{resolved.http.port}{resolved.http.route_prefix.rstrip('/')}"
            console.print(
                f"[bold green]captioner serving[/] {url}/v1/captions (OpenAPI: {url}/docs); "
                f"consuming {kafka.input_topic} → {kafka.output_topic}"
            )
            stop.wait()
            console.print("[yellow]stopping: no new requests; the ingest drains and commits…[/]")
            serve.delete(resolved.ray.app_name)  # waits for the replicas' graceful shutdown
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    console.print("[green]stopped[/]")
    return 0


@contextlib.contextmanager
def local_inference_tier(settings: Settings) -> Iterator[tuple[Settings, str, Any]]:
    """Local Ray + Serve with the inference app (HTTP API, batch endpoint, replicas) on a free
    loopback port; yields (settings, base URL, replica handle) once a replica is ready.

    What `captioner run` and `demo` use on embedded settings, so they take the same HTTP path
    to the replicas as an ingest pod does in production."""
    from ray import serve

    from deployment.app import application
    from workers.embedded import free_port
    from workers.replicas import DEPLOYMENT_NAME

    settings = local_replica_settings(settings)
    start_ray(settings.ray)
    import ray

    port = free_port()
    try:
        start_serve(settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})}), http=True)
        serve.run(application(settings, ingest=False), name=settings.ray.app_name, route_prefix="/")
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.ray.app_name)
        yield settings, f"http://{settings.http.host}:{port}", handle
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
