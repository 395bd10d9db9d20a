"""Files the engine writes: the same inputs give the same bytes, and a command that stops takes its
outputs back (engine.images.outputs)."""
import hashlib

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from engine import images

META = {c: c * 3 for c in "abcdefghij"}
TENSORS = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(5, dtype=torch.float16)}


def test_tensor_files_are_byte_identical_and_readable(tmp_path):
    raw = {hashlib.sha256(safetensors.torch.save(TENSORS, metadata=META)).hexdigest() for _ in range(8)}
    assert len(raw) > 1  # safetensors alone writes its header in hash order
    ours = set()
    for i in range(8):
        path = images.save_tensors(TENSORS, tmp_path / f"{i}.safetensors", META)
        ours.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(ours) == 1
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == META
        assert all(torch.equal(f.get_tensor(k), v) for k, v in TENSORS.items())


def test_outputs_are_taken_back_on_an_interrupt(tmp_path):
    old = tmp_path / "old.png"
    old.write_bytes(b"kept")
    with pytest.raises(KeyboardInterrupt), images.outputs():
        folder = images.make_folder(tmp_path / "a" / "b")
        images.write_atomic(folder / "x.json", lambda f: f.write(b"{}"))
        images.write_atomic(old, lambda f: f.write(b"new"))  # existed before: replaced, not removed
        images.save_tensors(TENSORS, tmp_path / "ckpt.safetensors", keep=True)
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "old.png"]
    with images.outputs():  # left normally: everything stays
        images.write_atomic(images.make_folder(tmp_path / "c") / "y.json", lambda f: f.write(b"{}"))
    assert (tmp_path / "c" / "y.json").is_file()
