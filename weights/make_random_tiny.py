"""Recipe for weights/random-tiny: the SD1-like fixture of tests/conftest.py (random weights, char-level
vocabulary), saved by diffusers. A stand-in so the README's first command runs on a fresh machine until the
trained tiny cascade ships; its images are noise-like by construction.

    python weights/make_random_tiny.py          # needs the test extras (diffusers, transformers)
"""
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import make_pipeline  # noqa: E402

if __name__ == "__main__":
    out = HERE / "random-tiny"
    shutil.rmtree(out, ignore_errors=True)
    make_pipeline("sd1", out)
    index = json.loads((out / "model_index.json").read_text())
    print(f"wrote {out}: {sorted(k for k in index if not k.startswith('_'))}")
