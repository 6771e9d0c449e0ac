"""The settings tree: precedence, and errors that name the key, the value and the problem."""

import pytest

from workers.config import ConfigError, load_settings


def test_defaults_are_valid_and_embedded():
    s = load_settings()
    assert s.kafka.embedded and s.s3.embedded
    assert s.generation.beam_size == 2 and s.generation.do_sample is False
    assert s.replicas.ongoing_requests >= s.replicas.max_batch_size


def test_env_beats_file_and_flags_beat_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  input_topic: from-file\n  output_topic: out-file\nreplicas:\n  max_batch_size: 4\n")
    monkeypatch.setenv("CAPTIONER_KAFKA__INPUT_TOPIC", "from-env")
    s = load_settings(cfg)
    assert s.kafka.input_topic == "from-env"
    assert s.kafka.output_topic == "out-file"
    assert s.replicas.max_batch_size == 4
    s = load_settings(cfg, kafka={"input_topic": "from-flag"})
    assert s.kafka.input_topic == "from-flag" and s.kafka.output_topic == "out-file"


@pytest.mark.parametrize(
    "yaml_text, key, fragment",
    [
        ("replicas:\n  max_batch_size: two\n", "replicas.max_batch_size", "'two'"),
        ("kafka:\n  inptu_topic: x\n", "kafka.inptu_topic", "Extra inputs"),
        ("worker:\n  max_in_flight: 0\n", "worker.max_in_flight", "greater than or equal to 1"),
        ("generation:\n  beam_size: 50\n", "generation.beam_size", "max_beam_size"),
        ("generation:\n  top_p: 1.5\n", "generation.top_p", "1.5"),
        ("replicas:\n  max_ongoing_requests: 1\n", "replicas.max_ongoing_requests", "greater than or equal to 2"),
        ("model:\n  backend: jax\n", "model.backend", "'jax'"),
    ],
)
def test_bad_config_names_key_value_and_problem(tmp_path, yaml_text, key, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    text = str(e.value)
    assert key in text and fragment in text and str(cfg) in text


def test_secrets_are_not_echoed_in_config_errors(monkeypatch):
    monkeypatch.setenv("CAPTIONER_KAFKA__SASL_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigError) as e:
        load_settings(kafka={"security_protocol": "SASL_SSL"})
    assert "hunter2-secret" not in str(e.value)
    assert "sasl_mechanism" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
