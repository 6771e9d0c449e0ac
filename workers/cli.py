"""`captioner` commands. Each parses its flags and calls one module; heavy imports stay lazy so
`--help` is instant and a TF process never imports torch it does not need."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="captioner",
    help="Streaming image captioning: Kafka in, S3 fetch, batched ViT-GPT2 replicas on Ray, captions out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")]


class LogFormatName(StrEnum):
    text = "text"
    json = "json"


# Commands whose log is their output; the others print tables and log only warnings by default.
_LONG_RUNNING = {"run", "serve"}


@app.callback()
def _global_options(
    ctx: typer.Context,
    log_format: Annotated[
        LogFormatName,
        typer.Option(
            "--log-format",
            envvar="CAPTIONER_LOG_FORMAT",
            help="json: one object per line, with request id and Kafka coordinates where known",
        ),
    ] = LogFormatName.text,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also Ray's, Serve's and the clients' own log lines")
    ] = False,
) -> None:
    """Options for every command; they go before it: `captioner --log-format json run`."""
    from workers.logs import configure_logging

    configure_logging(
        log_format.value,
        verbose=verbose,  # type: ignore[arg-type]
        quiet=ctx.invoked_subcommand not in _LONG_RUNNING,
    )


def _settings(config: Path | None, **overrides):
    from workers.config import ConfigError, load_settings

    try:
        settings = load_settings(config, **{k: v for k, v in overrides.items() if v})
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    if settings.model.backend == "tf":
        _tf_only_environment()
    return settings


def _tf_only_environment() -> None:
    """A TF process must say so before transformers is imported, or transformers imports torch."""
    import os

    from workers.model.tf_backend import TF_ONLY_ENVIRONMENT

    for name, value in TF_ONLY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders, or s3://bucket/prefix")],
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help="hub id, directory, s3:// prefix or tiny-random")] = None,
    backend: Annotated[Optional[str], typer.Option(help="torch or tf")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per generate call")] = 16,
    beam_size: Annotated[Optional[int], typer.Option()] = None,
    do_sample: Annotated[Optional[bool], typer.Option("--do-sample/--no-sample")] = None,
    max_output_length: Annotated[Optional[int], typer.Option()] = None,
    min_output_length: Annotated[Optional[int], typer.Option()] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option()] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option()] = None,
    n_return_sequences: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="results.jsonl or results.csv")] = None,
) -> None:
    """Caption images offline (the seed's own use): a table of image_name | caption.

    Exit code 0 when every image was captioned, 1 when some could not be (each is reported)."""
    from workers import offline

    generation = {
        k: v
        for k, v in dict(
            beam_size=beam_size,
            do_sample=do_sample,
            max_output_length=max_output_length,
            min_output_length=min_output_length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            n_return_sequences=n_return_sequences,
            seed=seed,
        ).items()
        if v is not None
    }
    model_over = {k: v for k, v in dict(source=model, backend=backend).items() if v is not None}
    settings = _settings(config, model=model_over, generation=generation)
    failed = offline.run(settings, inputs, batch_size=batch_size, output=output)
    # Every image is reported either way; the exit code lets a script notice the failures.
    raise typer.Exit(1 if failed else 0)


@app.command()
def bench(
    mode: Annotated[str, typer.Option(help="model, pipeline, engine, scale or memory")] = "model",
    backend: Annotated[str, typer.Option(help="torch, tf, or both (model, pipeline)")] = "torch",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated (model, pipeline)")] = "1,4,16",
    model: Annotated[str, typer.Option(help="full (random full-size) or tiny-random (model, pipeline)")] = "full",
    rounds: Annotated[int, typer.Option(min=1)] = 2,
    quick: Annotated[
        bool, typer.Option(help="engine, scale, memory: the small form CI runs (consistency, not speed)")
    ] = False,
    report: Annotated[Optional[Path], typer.Option(help="write PNG plots and summary.md to this folder")] = None,
) -> None:
    """Benchmarks that print ratios measured in one run, with the CPU's features (random weights)."""
    from harness import bench as bench_mod  # tooling, not runtime: imported only here

    bench_mod.main(
        mode=mode,
        backend=backend,
        batch_sizes=[int(b) for b in batch_sizes.split(",")],
        model=model,
        rounds=rounds,
        quick=quick,
        report_dir=report,
    )


@app.command()
def run(config: ConfigOpt = None) -> None:
    """The long-running worker: consume requests, caption, publish; SIGTERM drains and commits."""
    from deployment.local import local_inference_tier
    from workers import runner

    raise typer.Exit(runner.run(_settings(config), local_tier=local_inference_tier))


@app.command("serve")
def serve_cmd(config: ConfigOpt = None) -> None:
    """The Serve application locally: HTTP API + Kafka ingest + replicas (configs/serve.yaml's app)."""
    from deployment.local import serve_http

    raise typer.Exit(serve_http(_settings(config)))


@app.command()
def demo(
    config: ConfigOpt = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="default: the pretrained checkpoint if present, else toy-shapes on generated scenes"),
    ] = None,
) -> None:
    """Embedded everything: upload images, submit requests, run the worker, print the results."""
    from deployment.local import local_inference_tier
    from workers import runner

    raise typer.Exit(runner.demo(_settings(config), model=model, local_tier=local_inference_tier))


@app.command()
def submit(
    inputs: Annotated[list[str], typer.Argument(help="s3://bucket/prefix or local image files")],
    config: ConfigOpt = None,
    topic: Annotated[Optional[str], typer.Option(help="default: kafka.input_topic")] = None,
    bucket: Annotated[
        Optional[str], typer.Option(help="where local files are uploaded (default: first allow-listed)")
    ] = None,
) -> None:
    """Produce one request per image (uploading local files first)."""
    from workers import submit as submit_mod

    settings = _settings(config)
    count = submit_mod.submit(settings, inputs, topic=topic, bucket=bucket)
    typer.echo(f"submitted {count} request(s)")


@app.command()
def chaos(
    requests: Annotated[
        int, typer.Option(min=30, help="requests in the stream (poison and awkward images included)")
    ] = 300,
    seed: Annotated[int, typer.Option(help="makes the request mix, fault timing and S3 faults repeatable")] = 0,
    report: Annotated[Optional[Path], typer.Option(help="also write the report as JSON here")] = None,
    kill_replicas: Annotated[int, typer.Option(min=0, help="Serve replicas to ray.kill mid-stream")] = 1,
    kill_consumers: Annotated[int, typer.Option(min=0, help="consumer workers to SIGKILL (each replaced)")] = 1,
    broker_restarts: Annotated[int, typer.Option(min=0, help="broker kill -9 + restarts on durable storage")] = 1,
    s3_error_rate: Annotated[float, typer.Option(min=0, max=1, help="S3 calls answered 503/500")] = 0.05,
    s3_drop_rate: Annotated[float, typer.Option(min=0, max=1, help="S3 connections dropped")] = 0.02,
    s3_delay_rate: Annotated[float, typer.Option(min=0, max=1, help="S3 answers delayed")] = 0.02,
    s3_truncate_rate: Annotated[float, typer.Option(min=0, max=1, help="S3 bodies cut short")] = 0.02,
    s3_drip_rate: Annotated[
        float, typer.Option(min=0, max=1, help="S3 GET bodies dripped (cut off by the fetch deadline)")
    ] = 0.01,
    hang_replicas: Annotated[
        int, typer.Option(min=0, help="times every Serve replica is SIGSTOPped past the call timeout, then SIGCONT")
    ] = 1,
    throttle_bursts: Annotated[int, typer.Option(min=0, help="bursts of every S3 call answered 503 SlowDown")] = 1,
    drain_rebalances: Annotated[
        int, typer.Option(min=0, help="consumers SIGTERMed (drain) while a replacement joins")
    ] = 1,
    consumers: Annotated[int, typer.Option(min=1, help="consumer worker processes in the group")] = 2,
    max_in_flight: Annotated[int, typer.Option(min=1, help="worker.max_in_flight per consumer worker")] = 32,
    timeout: Annotated[
        Optional[float], typer.Option(help="seconds for the whole stream (default scales with --requests)")
    ] = None,
    keep: Annotated[bool, typer.Option(help="keep the work dir (logs, settings) under .tmp/")] = False,
) -> None:
    """A bounded, loopback-only chaos run (embedded S3, durable broker, Ray): exit 1 if anything was lost."""
    from harness import chaos as chaos_mod  # tooling, not runtime: imported only here

    opts = chaos_mod.ChaosOptions(
        requests=requests,
        seed=seed,
        kill_replicas=kill_replicas,
        kill_consumers=kill_consumers,
        broker_restarts=broker_restarts,
        s3_error_rate=s3_error_rate,
        s3_drop_rate=s3_drop_rate,
        s3_delay_rate=s3_delay_rate,
        s3_truncate_rate=s3_truncate_rate,
        s3_drip_rate=s3_drip_rate,
        hang_replicas=hang_replicas,
        throttle_bursts=throttle_bursts,
        drain_rebalances=drain_rebalances,
        consumers=consumers,
        max_in_flight=max_in_flight,
        timeout_s=timeout,
        keep_workdir=keep,
    )
    result = chaos_mod.run_chaos(opts, command=chaos_mod.command_line())
    chaos_mod.print_report(result)
    if report is not None:
        chaos_mod.write_report(result, report)
    raise typer.Exit(0 if result.ok else 1)


def _broker_settings(config: Path | None):
    settings = _settings(config)
    if settings.kafka.embedded:
        typer.secho(
            "this command reads a running broker: set kafka.bootstrap_servers (config or "
            "CAPTIONER_KAFKA__BOOTSTRAP_SERVERS), not 'embedded'",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    return settings


@app.command()
def lag(
    config: ConfigOpt = None,
    group: Annotated[str | None, typer.Option(help="consumer group (default: kafka.group_id)")] = None,
    topic: Annotated[list[str] | None, typer.Option(help="topic(s) (default: kafka.input_topic)")] = None,
    sample: Annotated[
        float, typer.Option(min=0, help="seconds between the two readings the rate comes from; 0: one reading")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of the table")] = False,
) -> None:
    """Per partition: the group's committed offset, the end offset, the lag and its rate of change."""
    from rich.console import Console

    from workers.ops.lag import group_lag, lag_json, lag_table

    settings = _broker_settings(config)
    group = group or settings.kafka.group_id
    try:
        rows = group_lag(settings.kafka, group, topic or [settings.kafka.input_topic], sample_s=sample)
    except LookupError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(lag_json(group, rows))
    else:
        Console().print(lag_table(group, rows))


@app.command()
def replay(
    config: ConfigOpt = None,
    code: Annotated[list[str] | None, typer.Option(help="only dead letters with this error code (repeatable)")] = None,
    request_id: Annotated[list[str] | None, typer.Option("--id", help="only this request id (repeatable)")] = None,
    key: Annotated[list[str] | None, typer.Option(help="only this Kafka key (repeatable)")] = None,
    from_offset: Annotated[
        int | None, typer.Option(min=0, help="start at this offset (each partition); a re-scan")
    ] = None,
    to_offset: Annotated[int | None, typer.Option(min=0, help="stop after this offset (inclusive)")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="start at the first dead letter at/after this time; a re-scan")
    ] = None,
    until: Annotated[datetime | None, typer.Option(help="stop after this time (inclusive)")] = None,
    partition: Annotated[list[int] | None, typer.Option(help="only this dead-letter partition (repeatable)")] = None,
    group: Annotated[
        str | None,
        typer.Option(help="replay's own group, remembering where it got to (default: <kafka.group_id>.replay)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="send at most this many")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="read and report, send nothing, remember nothing")] = False,
) -> None:
    """Re-send dead letters' original requests (value, key, headers) to the input topic.

    Exit code 0 when every selected dead letter was sent (or, dry, could be), 1 otherwise."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from workers.ops.deadletters import ReplayFilter
    from workers.ops.replay import ReplayOptions, summary_tables
    from workers.ops.replay import replay as run_replay

    settings = _broker_settings(config)
    if from_offset is not None and since is not None:
        typer.secho("--from-offset and --since both say where to start: give one", fg="red", err=True)
        raise typer.Exit(2)
    options = ReplayOptions(
        group=group or f"{settings.kafka.group_id}.replay",
        filter=ReplayFilter.of(code or (), request_id or (), key or ()),
        from_offset=from_offset,
        to_offset=to_offset,
        since=since,
        until=until,
        partitions=frozenset(partition or ()),
        limit=limit,
        dry_run=dry_run,
    )
    columns = (TextColumn("dead letters"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("read", total=None)
        try:
            summary = run_replay(
                settings.kafka,
                settings.limits,
                options,
                progress=lambda done, total: bar.update(task, completed=done, total=max(total, done)),
            )
        except LookupError as e:
            typer.secho(str(e), fg="red", err=True)
            raise typer.Exit(2) from None
    out = Console()
    for part in summary_tables(summary):
        out.print(part, markup=False, highlight=False)
    raise typer.Exit(0 if summary.ok else 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
