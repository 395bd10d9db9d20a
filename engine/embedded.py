"""Where the embedded model lies (weights/README.md), the default of every command: engine/weights/
when installed, weights/ beside engine/ in a source checkout."""
from pathlib import Path

_WEIGHTS = [Path(__file__).resolve().parent / "weights",
            Path(__file__).resolve().parent.parent / "weights"]
DEFAULT_MODEL = next((w for w in _WEIGHTS if (w / "tiny").is_dir()), _WEIGHTS[-1]) / "tiny"
DEFAULT_UPSCALER = DEFAULT_MODEL.with_name("tiny-x4")
