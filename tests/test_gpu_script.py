"""bench/gpu.py, the script for a lent GPU, runs its whole code path on the CPU (tiny shapes, Triton interpreted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    j = json.loads(out.read_text())
    assert j["errors"] == {} and j["dry_run"] and j["commit"] is not None
    rows = j["parts"]["kernels"]
    assert {r["kernel"] for r in rows} == {"attention", "group_norm_silu", "conv3x3"}
    assert all("error" not in r and r["rel_error"] < 1e-4 for r in rows)
    p = j["parts"]["pipeline"]
    for who in ("ours_triton", "ours_torch", "diffusers_sdpa"):
        assert p[f"{who}_step_s"] > 0 and p[f"{who}_generate_it_s"] > 0
    assert p["unet_flops_per_step"] > 0 and p["ours_vs_diffusers_step_rel_error"] < 1e-4
    assert j["parts"]["vae"]["tiled_decode_s"] > 0
