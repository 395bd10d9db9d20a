"""What a bench result records of the run that made it, and result files written one part at a time."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.embedded import source_commit, versions  # noqa: E402


def stamp(script: str, model_version=None) -> dict:
    """The source commit, the model versions (default: the embedded models') and the command. Take it
    before the run writes its pictures: they are tracked files, and would make the checkout dirty."""
    return {"commit": source_commit(), "model_version": versions() if model_version is None else model_version,
            "command": " ".join(["python", f"bench/{script}", *sys.argv[1:]])}


def save_part(path: Path, part: str, value, stamped: dict, indent: int = 2, **top):
    """Write `value` as `part` of the JSON file at `path` with its run's stamp, and leave the other parts
    as they are. A part that is a list of rows is written as given: stamp its new rows. A model version
    the file recorded once for every part moves into each part (each row). `top`: fields of the whole
    file to set."""
    results = json.loads(path.read_text()) if path.exists() else {}
    older = results.pop("model_version", None)
    if older is not None:
        for v in results.values():
            for row in v if isinstance(v, list) else [v]:
                if isinstance(row, dict):
                    row.setdefault("model_version", older)
    results.update(top)
    results[part] = value if isinstance(value, list) else {**value, **stamped}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent) + "\n")
