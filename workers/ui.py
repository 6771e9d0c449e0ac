"""What the commands show a person: the one untrained-model banner."""

from __future__ import annotations

from rich.panel import Panel

from workers.config import DEFAULT_MODEL


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
