"""Generation parameters: every invalid value is a clear error naming the parameter; limits cap."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.config import ConfigError, LimitsConfig, load_settings
from workers.contract import ErrorCode, Rejected, resolve_params
from workers.params import GenerationParams

INVALID = [
    ("beam_size", 0),
    ("beam_size", -2),
    ("beam_size", "many"),
    ("beam_size", 1.5),
    ("do_sample", "perhaps"),
    ("max_output_length", 0),
    ("min_output_length", -1),
    ("temperature", 0),
    ("temperature", -1.0),
    ("top_k", -1),
    ("top_p", 0),
    ("top_p", 1.01),
    ("repetition_penalty", 0),
    ("no_repeat_ngram_size", -1),
    ("n_return_sequences", 0),
    ("seed", -5),
    ("seed", "abc"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_each_invalid_param_names_itself(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        GenerationParams(**{name: value})
    assert [e["loc"] for e in err.value.errors()] == [(name,)]
    assert name in str(err.value)


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_request_params_are_rejected_as_invalid_message(name: str, value: object) -> None:
    with pytest.raises(Rejected) as err:
        resolve_params(GenerationParams(), {name: value}, LimitsConfig())
    assert err.value.code == ErrorCode.INVALID_MESSAGE
    assert name in err.value.message


def test_unknown_param_is_named() -> None:
    with pytest.raises(ValidationError, match="beam_width"):
        GenerationParams(beam_width=3)
    with pytest.raises(Rejected, match="beam_width"):
        resolve_params(GenerationParams(), {"beam_width": 3}, LimitsConfig())


def test_inconsistent_combinations_name_both_params() -> None:
    with pytest.raises(ValidationError, match=r"min_output_length \(20\) must not exceed max_output_length \(16\)"):
        GenerationParams(min_output_length=20)
    with pytest.raises(ValidationError, match=r"n_return_sequences \(3\) must not exceed beam_size \(2\)"):
        GenerationParams(beam_size=2, n_return_sequences=3)
    # Sampling can return more sequences than beams.
    assert GenerationParams(beam_size=1, do_sample=True, n_return_sequences=3).n_return_sequences == 3


@pytest.mark.parametrize(
    "override,message",
    [
        ({"beam_size": 9}, r"beam_size=9 exceeds limits.max_beam_size \(8\)"),
        ({"max_output_length": 65}, r"max_output_length=65 exceeds limits.max_output_length \(64\)"),
        ({"beam_size": 8, "n_return_sequences": 9}, r"n_return_sequences \(9\) must not exceed beam_size"),
        (
            {"do_sample": True, "n_return_sequences": 9},
            r"n_return_sequences=9 exceeds limits.max_return_sequences \(8\)",
        ),
    ],
)
def test_limits_cap_request_params(override: dict, message: str) -> None:
    with pytest.raises(Rejected, match=message) as err:
        resolve_params(GenerationParams(), override, LimitsConfig())
    assert err.value.code == ErrorCode.INVALID_MESSAGE
    # At the caps exactly: accepted.
    assert resolve_params(GenerationParams(), {"beam_size": 8, "max_output_length": 64}, LimitsConfig()).beam_size == 8


def test_configured_defaults_must_fit_the_limits() -> None:
    with pytest.raises(ConfigError, match=r"generation.beam_size=5 exceeds limits.max_beam_size \(4\)"):
        load_settings(generation={"beam_size": 5}, limits={"max_beam_size": 4})
    with pytest.raises(ConfigError, match="generation.temperature"):
        load_settings(generation={"temperature": 0})


def test_generate_kwargs_map_the_spark_names() -> None:
    kwargs = GenerationParams(
        beam_size=3, max_output_length=20, min_output_length=4, n_return_sequences=2
    ).generate_kwargs()
    assert kwargs == {
        "num_beams": 3,
        "do_sample": False,
        "max_new_tokens": 20,
        "min_new_tokens": 4,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_return_sequences": 2,
    }
    sampling = GenerationParams(beam_size=1, do_sample=True, temperature=0.7, top_k=10, top_p=0.9).generate_kwargs()
    assert (sampling["temperature"], sampling["top_k"], sampling["top_p"]) == (0.7, 10, 0.9)


def test_params_are_hashable_and_overrides_revalidate() -> None:
    base = GenerationParams()
    assert hash(base) == hash(GenerationParams()) and base.with_overrides({}) is base
    assert base.with_overrides({"beam_size": 4}) == GenerationParams(beam_size=4)
    with pytest.raises(ValidationError, match="n_return_sequences"):
        base.with_overrides({"n_return_sequences": 3})
