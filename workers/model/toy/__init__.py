"""The toy captioner: generated scenes of coloured shapes with known captions (`scenes`), the
script that trains a small ViT + GPT-2 on them (`train`), and the trained weights (`weights/`,
`model.source: toy-shapes`). A toy, labelled as such: it captions those scenes and nothing else;
it exists so precision modes can be judged on captions that can be right or wrong."""

from pathlib import Path

# Where the trained weights are shipped (and where `train` writes them by default).
SHIPPED = Path(__file__).parent / "weights"
