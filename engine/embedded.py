"""Where the embedded model lies (weights/README.md), the default of every command: engine/weights/
when installed, weights/ beside engine/ in a source checkout; and the model versions and source commit
that results measured on it are stamped with."""
import json
import subprocess
from pathlib import Path

_WEIGHTS = [Path(__file__).resolve().parent / "weights",
            Path(__file__).resolve().parent.parent / "weights"]
DEFAULT_MODEL = next((w for w in _WEIGHTS if (w / "tiny").is_dir()), _WEIGHTS[-1]) / "tiny"
DEFAULT_UPSCALER = DEFAULT_MODEL.with_name("tiny-x4")


def versions() -> dict:
    """The version each embedded folder's model_index.json names (`_engine_version`), by folder name."""
    return {d.name: json.loads((d / "model_index.json").read_text()).get("_engine_version", "unknown")
            for d in (DEFAULT_MODEL, DEFAULT_UPSCALER)}


def source_commit() -> str:
    """`git describe --always --dirty` of the source checkout the engine runs from ("" when there is none:
    an installed engine, even inside some other repository)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=root).stdout.strip()
    try:
        if git("rev-parse", "--show-toplevel") != str(root):
            return ""
        return git("describe", "--always", "--dirty")
    except OSError:  # no git
        return ""
