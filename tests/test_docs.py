"""The docs are for users: the README stays a short guide and every results table is generated from the
JSON under bench/results (bench/tables.py), never typed by hand."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "weights" / "README.md"]


def test_generated_tables_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_is_a_short_guide_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "python -m engine demo" in text and "python -m pytest -q" in text


def test_docs_name_no_machines_sessions_or_issues():
    for doc in DOCS:
        text = doc.read_text()
        assert not re.search(r"\b(Xeon|EPYC|Sapphire Rapids|issue \d+|this session|today)\b", text), doc


def test_bench_results_record_each_parts_run(tmp_path, monkeypatch):
    """A result file written one part at a time keeps each part's own commit, model and command, and moves
    a model version it recorded once for the whole file into the parts that had it."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("stamps", ROOT / "bench" / "stamps.py")
    stamps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stamps)
    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--only", "b"])
    stamped = stamps.stamp("bench_x.py")
    assert stamped["command"] == "python bench/bench_x.py --only b" and {"commit", "model_version"} <= set(stamped)
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"model_version": {"tiny": "v1"}, "a": {"psnr": 30}, "rows": [{"size": 1}]}))
    stamps.save_part(path, "b", {"psnr": 31}, stamped, device="cpu")
    stamps.save_part(path, "rows", [{"size": 1, "model_version": {"tiny": "v1"}}, {"size": 2, **stamped}], stamped)
    d = json.loads(path.read_text())
    assert "model_version" not in d and d["device"] == "cpu"
    assert d["a"] == {"psnr": 30, "model_version": {"tiny": "v1"}}
    assert d["b"] == {"psnr": 31, **stamped}
    assert d["rows"] == [{"size": 1, "model_version": {"tiny": "v1"}}, {"size": 2, **stamped}]
