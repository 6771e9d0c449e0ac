"""The `caption` command end to end with tiny-random: table, JSONL/CSV rows, per-image errors,
the untrained banner; folder and s3:// inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.model_fixtures import SAMPLE_FILES, bad_files, tiny_cache_dir, tiny_model  # noqa: F401
from workers import offline
from workers.cli import app
from workers.config import load_settings
from workers.images import prepare
from workers.params import GenerationParams

BAD = bad_files()
BAD_CODES = {name: "image_too_large" if "bomb" in name else "invalid_image" for name in BAD}


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in SAMPLE_FILES:
        shutil.copy(path, folder / path.name)
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    (folder / "NOTES.md").write_text("not picked up: a folder listing takes image suffixes only")
    return folder


def _expected_captions(model, params: GenerationParams) -> dict[str, list[str]]:
    pixels = np.stack([prepare(p.read_bytes(), size=model.spec, max_pixels=50_000_000).pixels for p in SAMPLE_FILES])
    return {p.name: out.captions for p, out in zip(SAMPLE_FILES, model.caption(pixels, params), strict=True)}


def _invoke(args: list[str], cache_dir: Path, exit_code: int = 1):
    """Run the CLI; the folders here hold bad files, so exit code 1 (some images failed) is expected."""
    runner = CliRunner()
    # A wide terminal so rich prints every cell on one line (Spark's show(truncate=False)).
    # float32: the captions are compared with the fp32 reference model's (`auto` follows the CPU).
    env = {"CAPTIONER_MODEL__CACHE_DIR": str(cache_dir), "CAPTIONER_MODEL__DTYPE": "float32", "COLUMNS": "200"}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == exit_code, (result.output, result.exception)
    return result.output


def test_caption_command_jsonl(image_folder: Path, tmp_path: Path, tiny_cache_dir: Path, tiny_model) -> None:
    out_file = tmp_path / "results.jsonl"
    output = _invoke(
        ["caption", str(image_folder), "--model", "tiny-random", "--batch-size", "4", "-o", str(out_file)],
        tiny_cache_dir,
    )
    expected = _expected_captions(tiny_model, GenerationParams())  # the defaults: beam 2

    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    names = sorted([p.name for p in SAMPLE_FILES] + list(BAD))
    assert [r["image_name"] for r in rows] == names  # sorted folder listing, NOTES.md skipped
    for row in rows:
        assert row["untrained"] is True
        if row["image_name"] in BAD:
            assert row["caption"] is None
            assert row["error"].startswith(BAD_CODES[row["image_name"]] + ": "), row
        else:
            assert row["error"] is None and "captions" not in row
            assert row["caption"] == expected[row["image_name"]][0]

    # The table: header, one line per image with its caption or error, the banner, the summary.
    assert "image_name" in output and "caption" in output
    for name, captions in expected.items():
        line = next(line for line in output.splitlines() if f" {name} " in line)
        assert captions[0] in line
    for name, code in BAD_CODES.items():
        line = next(line for line in output.splitlines() if f" {name} " in line)
        assert f"ERROR {code}" in line
    assert output.count("UNTRAINED MODEL") == 2  # before and after the table
    assert "captions are meaningless" in output.lower() or "meaningless" in output
    assert f"{len(SAMPLE_FILES)} captioned, {len(BAD)} failed" in output


def test_caption_command_csv_with_several_captions(
    image_folder: Path, tmp_path: Path, tiny_cache_dir: Path, tiny_model
) -> None:
    out_file = tmp_path / "results.csv"
    _invoke(
        [
            "caption",
            str(image_folder / "chelsea.jpg"),
            str(image_folder / "bad_truncated.jpg"),
            str(tmp_path / "missing.jpg"),
            "--model",
            "tiny-random",
            "--beam-size",
            "4",
            "--n-return-sequences",
            "2",
            "-o",
            str(out_file),
        ],
        tiny_cache_dir,
    )
    rows = list(csv.DictReader(out_file.open(newline="")))
    assert [r["image_name"] for r in rows] == [
        str(image_folder / "chelsea.jpg"),
        str(image_folder / "bad_truncated.jpg"),
        str(tmp_path / "missing.jpg"),
    ]
    expected = _expected_captions(tiny_model, GenerationParams(beam_size=4, n_return_sequences=2))["chelsea.jpg"]
    assert json.loads(rows[0]["captions"]) == expected and rows[0]["caption"] == expected[0]
    assert rows[0]["error"] == "" and rows[0]["untrained"] == "True"
    assert rows[1]["error"].startswith("invalid_image: ") and rows[1]["caption"] == ""
    assert rows[2]["error"].startswith("object_not_found: ")


def test_run_returns_the_number_of_failures(image_folder: Path, tiny_cache_dir: Path) -> None:
    settings = load_settings(model={"source": "tiny-random", "cache_dir": str(tiny_cache_dir)})
    assert offline.run(settings, [str(image_folder)], batch_size=16, output=None) == len(BAD)
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        offline.run(settings, [str(image_folder)], batch_size=16, output=Path("results.txt"))


@pytest.mark.s3
def test_s3_prefix_input(tmp_path: Path, tiny_cache_dir: Path, tiny_model, s3_server, monkeypatch) -> None:
    for key, value in s3_server.env().items():
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, value)
    client = s3_server.client()
    prefix = f"offline-{tmp_path.name}/"
    for path in SAMPLE_FILES[:3]:
        client.put_object(Bucket="images", Key=prefix + path.name, Body=path.read_bytes())
    client.put_object(Bucket="images", Key=prefix + "sub/empty.jpg", Body=b"")
    big = SAMPLE_FILES[4]  # hubble_deep_field.jpg, 234 KB: over the object limit set below
    client.put_object(Bucket="images", Key=prefix + "zz-" + big.name, Body=big.read_bytes())
    settings = load_settings(
        model={"source": "tiny-random", "cache_dir": str(tiny_cache_dir)},
        s3=s3_server.s3_config().model_dump(),
        limits={"max_object_bytes": 100_000},
    )
    out_file = tmp_path / "s3.jsonl"
    failed = offline.run(settings, [f"s3://images/{prefix}"], batch_size=2, output=out_file)
    rows = {r["image_name"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    expected = _expected_captions(tiny_model, GenerationParams())
    assert failed == 2
    assert sorted(rows) == sorted([p.name for p in SAMPLE_FILES[:3]] + ["sub/empty.jpg", "zz-" + big.name])
    for path in SAMPLE_FILES[:3]:
        assert rows[path.name]["caption"] == expected[path.name][0]
    assert rows["sub/empty.jpg"]["error"].startswith("invalid_image: ")
    assert rows["zz-" + big.name]["error"].startswith("object_too_large: ")


def test_caption_command_exits_zero_when_every_image_is_captioned(tiny_cache_dir: Path) -> None:
    output = _invoke(["caption", str(SAMPLE_FILES[0]), "--model", "tiny-random"], tiny_cache_dir, exit_code=0)
    assert "1 captioned, 0 failed" in output
