"""What the commands show a person about the model: the untrained-model banner, the toy-model banner."""

from __future__ import annotations

from typing import Any

from rich.panel import Panel

from workers.config import DEFAULT_MODEL, TOY_SHAPES


def untrained_banner(name: str) -> Panel:
    """Shown before and after any output of a model with random weights: its captions mean nothing."""
    return Panel(
        f"The model [bold]{name}[/] has RANDOM, UNTRAINED weights.\n"
        "Its captions are meaningless tokens, shown only to prove the pipeline works end to end.\n"
        f"For real captions put the pretrained checkpoint ({DEFAULT_MODEL}) in the Hugging Face\n"
        "cache or a local directory and pass --model.",
        title="[bold red]UNTRAINED MODEL[/]",
        border_style="bold red",
    )


def toy_banner() -> Panel:
    """Shown after the demo's table when the toy captioner made it: trained, but on shapes only."""
    return Panel(
        f"[bold]{TOY_SHAPES}[/] is a TOY captioner (223 k parameters) trained here on generated scenes of "
        "coloured circles, squares and triangles. It captions such scenes and nothing else; the table says "
        "whether each caption is the scene's true one. For photos put the pretrained checkpoint "
        f"({DEFAULT_MODEL}) in the Hugging Face cache or a local directory and pass --model.",
        title="[bold yellow]TOY MODEL[/]",
        border_style="yellow",
    )


def model_banner(model_record: dict[str, Any]) -> Panel | None:
    """The banner a served model's record calls for (`Pipeline.model_record`): untrained, toy, or none."""
    if model_record.get("untrained"):
        return untrained_banner(model_record["name"])
    if model_record.get("name") == TOY_SHAPES:
        return toy_banner()
    return None
