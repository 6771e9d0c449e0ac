"""The `caption` command: image files, folders or an s3:// prefix → a table and JSONL/CSV rows.

One bad image never stops the run: it gets a row with its reason (`code: message`) and the
rest are captioned. Images are read and decoded one batch at a time, so memory stays flat on
large folders. Returns the number of images that failed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workers.config import Settings
from workers.contract import ErrorCode, Rejected, describe
from workers.fetch import Fetcher
from workers.images import IMAGE_SUFFIXES, InputSize, Prepared
from workers.s3 import is_s3_uri, join_uri, list_objects, make_s3_client, split_uri
from workers.stages import Stages
from workers.ui import untrained_banner

OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class ImageItem:
    """One image to caption: its display name and where its bytes are (an s3:// URI or a file)."""

    name: str
    location: str | Path

    def read(self, stages: Stages) -> bytes:
        """The bytes through the fetch stage (allow-list, limits, retries), or Rejected."""
        if isinstance(self.location, Path):
            return stages.read(_file_reader(self.location, stages.settings.limits.max_object_bytes))
        return stages.fetch(self.location).data


@dataclass
class Row:
    image_name: str
    captions: list[str]
    error: str | None
    untrained: bool

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_name": self.image_name, "caption": self.captions[0] if self.captions else None}
        if len(self.captions) > 1:
            out["captions"] = self.captions
        out["error"] = self.error
        out["untrained"] = self.untrained
        return out


def run(settings: Settings, inputs: list[str], *, batch_size: int, output: Path | None) -> int:
    """Caption `inputs`, print the table, write `output` (.jsonl or .csv); return the failures."""
    console = Console()
    out_format = _output_format(output)
    if settings.model.backend == "torch":
        # Only effective before transformers is first imported: keeps TensorFlow (+2 s, +600 MB)
        # out of a PyTorch-only process.
        os.environ.setdefault("USE_TF", "0")
    from workers.model.core import load_model

    s3_client = _s3_client(settings) if any(is_s3_uri(i) for i in inputs) else None
    items = list(_expand(inputs, s3_client))
    model = load_model(settings.model, settings.s3)
    untrained = model.info.untrained
    fetcher = Fetcher(s3_client, settings.s3, settings.limits) if s3_client is not None else None
    spec = model.spec
    stages = Stages(settings, fetcher, InputSize(spec.height, spec.width, int(spec.resample)))
    banner = untrained_banner(model.info.name)
    if untrained:
        console.print(banner)

    params = settings.generation
    rows: list[Row] = []
    progress = Progress(
        TextColumn("captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("captioning", total=len(items))
        for batch in _chunks(items, batch_size):
            prepared: list[tuple[int, Prepared]] = []
            batch_rows: list[Row] = []
            for item in batch:
                row = Row(item.name, [], None, untrained)
                batch_rows.append(row)
                try:
                    prepared.append((len(batch_rows) - 1, stages.decode(item.read(stages))))
                except Rejected as e:
                    row.error = f"{e.code}: {e.message}"
            if prepared:
                try:
                    outputs = model.caption(np.stack([p.pixels for _, p in prepared]), params)
                    for (index, _), out in zip(prepared, outputs, strict=True):
                        batch_rows[index].captions = out.captions
                except Exception as e:  # the batch fails, the run goes on
                    for index, _ in prepared:
                        batch_rows[index].error = f"{ErrorCode.INFERENCE_FAILED}: {describe(e)}"
            rows.extend(batch_rows)
            progress.advance(task, len(batch))

    console.print(_table(rows, model.info.name))
    failed = sum(1 for r in rows if r.error)
    console.print(f"{len(rows) - failed} captioned, {failed} failed")
    if output is not None:
        _write(output, out_format, rows)
        console.print(f"wrote {len(rows)} row(s) to {output}")
    if untrained:
        console.print(banner)
    return failed


def _output_format(output: Path | None) -> str | None:
    if output is None:
        return None
    fmt = OUTPUT_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise ValueError(f"--output {output}: use a .jsonl or .csv file name")
    return fmt


def _table(rows: list[Row], model_name: str) -> Table:
    # Like Spark's show(truncate=False): every caption in full, wrapped rather than cut.
    table = Table(title=f"captions ({model_name})", show_lines=False)
    table.add_column("image_name", overflow="fold")
    table.add_column("caption", overflow="fold")
    for row in rows:
        if row.error:
            table.add_row(row.image_name, f"[red]ERROR {row.error}[/red]")
        else:
            table.add_row(row.image_name, "\n".join(row.captions) if len(row.captions) > 1 else row.captions[0])
    return table


def _write(output: Path, fmt: str | None, rows: list[Row]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=["image_name", "caption", "captions", "error", "untrained"])
            writer.writeheader()
            for row in rows:
                record = row.record()
                record["captions"] = json.dumps(row.captions, ensure_ascii=False) if len(row.captions) > 1 else ""
                record["error"] = record["error"] or ""
                writer.writerow(record)
        else:
            for row in rows:
                f.write(json.dumps(row.record(), ensure_ascii=False) + "\n")


def _chunks(items: list[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------ inputs


def _expand(inputs: list[str], s3_client: Any) -> Iterator[ImageItem]:
    for entry in inputs:
        if is_s3_uri(entry):
            yield from _s3_items(s3_client, entry)
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield ImageItem(child.name, child)
        else:
            yield ImageItem(entry, path)


def _file_reader(path: Path, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise Rejected(ErrorCode.OBJECT_NOT_FOUND, f"no such file: {path}") from None
        except OSError as e:
            raise Rejected(ErrorCode.FETCH_FAILED, f"cannot read {path}: {e}") from None
        if size > max_bytes:
            raise Rejected(ErrorCode.OBJECT_TOO_LARGE, f"{size} bytes exceeds limits.max_object_bytes ({max_bytes})")
        try:
            return path.read_bytes()
        except OSError as e:
            raise Rejected(ErrorCode.FETCH_FAILED, f"cannot read {path}: {e}") from None

    return read


def _s3_client(settings: Settings) -> Any:
    if settings.s3.embedded:
        raise ValueError(
            "s3:// inputs need s3.endpoint_url set to a real endpoint (an http(s) URL, or null for "
            "AWS); `caption` does not start the embedded server"
        )
    return make_s3_client(settings.s3)


def _s3_items(client: Any, uri: str) -> Iterator[ImageItem]:
    """Every object under the prefix, sorted by key; names are keys relative to the prefix."""
    bucket, prefix = split_uri(uri)
    # Names are relative to the prefix's "folder": s3://b/photos/ and s3://b/photos/ca both
    # name s3://b/photos/cat.jpg "cat.jpg".
    base = prefix[: prefix.rfind("/") + 1]
    for obj in sorted(list_objects(client, bucket, prefix), key=lambda o: o.key):
        yield ImageItem(obj.key[len(base) :] or obj.key, join_uri(bucket, obj.key))
