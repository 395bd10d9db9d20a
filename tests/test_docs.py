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
