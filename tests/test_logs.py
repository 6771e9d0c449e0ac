"""--log-format json, --verbose, and Ray's driver output kept out of a command's stdout."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workers.logs import configure_logging, log_fields, ray_output_as_logs

REPO = Path(__file__).resolve().parents[1]
# Short: Ray's unix sockets live below it (107-byte limit); apart from the session cluster's.
RAY_TMP = os.environ.get("CAPTIONER_TEST_RAY_TMP", f"/tmp/captioner-test-ray-{os.getuid()}")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("workers").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("workers").setLevel(saved[2])


def test_json_lines_carry_request_id_and_kafka_coordinates(restore_logging) -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    log = logging.getLogger("workers.test")
    log.info(
        "dead letter %s",
        "object_not_found",
        extra=log_fields(request_id="cat-42", topic="images", partition=3, offset=1187),
    )
    log.warning("no coordinates here")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["message"] == "dead letter object_not_found"
    assert (first["level"], first["logger"]) == ("INFO", "workers.test")
    assert (first["request_id"], first["topic"], first["partition"], first["offset"]) == ("cat-42", "images", 3, 1187)
    assert "time" in first and "request_id" not in lines[1]


def test_third_party_info_only_with_verbose(restore_logging) -> None:
    for verbose, expected in ((False, ["kafka warning"]), (True, ["kafka info", "kafka warning"])):
        stream = io.StringIO()
        configure_logging("text", verbose=verbose, stream=stream)
        logging.getLogger("kafka.conn").info("kafka info")
        logging.getLogger("kafka.conn").warning("kafka warning")
        assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == expected


def test_ray_prints_become_verbose_logs_not_stdout(restore_logging, capsys) -> None:
    for verbose in (False, True):
        stream = io.StringIO()
        configure_logging("text", verbose=verbose, stream=stream)
        with ray_output_as_logs():
            print("(raylet) The actor is dead because it was killed by `ray.kill`.")
        assert "ray.kill" not in capsys.readouterr().out
        assert ("ray.kill" in stream.getvalue()) is verbose


@pytest.mark.slow
@pytest.mark.ray
def test_demo_prints_its_table_and_no_ray_noise() -> None:
    """The whole demo in its own process (it starts and stops its own Ray)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CAPTIONER_RAY_TMP": f"{RAY_TMP}-demo",
        "USE_TF": "0",
        "COLUMNS": "120",
        "CAPTIONER_MODEL__CACHE_DIR": str(REPO / ".tmp" / "models"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo"], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # No pretrained checkpoint here: the toy captioner on generated scenes, each checked.
    assert "image_name" in out.stdout and "scene-01.png" in out.stdout and "TOY MODEL" in out.stderr
    right = re.search(r"(\d+) of 8 captions are the scene's true caption", out.stdout)
    assert right and int(right.group(1)) >= 6, out.stdout[-3000:]  # its accuracy is 0.958
    everything = out.stdout + out.stderr
    noise_lines = (
        "ray.kill",
        "(raylet)",
        "Started a local Ray instance",
        "Started Serve",
        "is ready",
        "group_id is None",
    )
    for noise in noise_lines:
        assert noise not in everything, noise
    # The table, with its count of right captions, is the last thing on stdout.
    assert out.stdout.rstrip().endswith("true caption")


def test_the_cli_option_and_its_environment_variable_select_json(restore_logging) -> None:
    from pythonjsonlogger.json import JsonFormatter
    from typer.testing import CliRunner

    from workers import logs
    from workers.cli import app

    for args, env in ((["--log-format", "json"], {}), ([], {"CAPTIONER_LOG_FORMAT": "json"})):
        result = CliRunner().invoke(app, [*args, "lag", "--help"], env=env)
        assert result.exit_code == 0, result.output
        assert isinstance(logs._handler.formatter, JsonFormatter)
    assert CliRunner().invoke(app, ["--log-format", "yaml", "lag", "--help"]).exit_code == 2


def test_demo_table_says_which_captions_are_true(capsys) -> None:
    from workers.runner import print_outcomes

    outcomes = {"a.png": {"caption": "a red circle above a blue square"}, "b.png": {"caption": "a green square"}}
    expected = {"a.png": "a red circle above a blue square", "b.png": "two green squares"}
    print_outcomes(outcomes, ["a.png", "b.png"], expected)
    out = capsys.readouterr().out
    assert "no: two green squares" in out and "1 of 2 captions are the scene's true caption" in out
    print_outcomes(outcomes, ["a.png", "b.png"])  # photos: no truth, no such column
    assert "true caption?" not in capsys.readouterr().out
