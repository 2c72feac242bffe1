"""The accelerator script is ready for a GPU: it runs end to end in its tiny mode on a CPU, and reads the
device's datasheet limits by name."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import accelerator

ROOT = Path(__file__).resolve().parent.parent


def test_datasheet_limits_are_found_by_device_name():
    assert accelerator.datasheet(accelerator.PEAK_BF16, "NVIDIA H200") == 989.4
    assert accelerator.datasheet(accelerator.PEAK_BF16, "NVIDIA H100 PCIe") == 756.0
    assert accelerator.datasheet(accelerator.HBM_GBPS, "NVIDIA A100-SXM4-80GB") == 2039.0
    assert accelerator.datasheet(accelerator.HBM_GBPS, "NVIDIA A100-SXM4-40GB") == 1555.0
    assert accelerator.datasheet(accelerator.PEAK_BF16, "Tesla T4") is None


@pytest.mark.slow
def test_the_script_runs_in_tiny_mode_on_cpu():
    """`bash benchmarks/accelerator.sh --tiny`: every train and decode measurement succeeds (eager and
    compiled, ours and transformers) and the last line holds them as JSON."""
    env = {**os.environ, "ACCELERATOR_TIMEOUT": "500", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", "benchmarks/accelerator.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("ours", "ours_compiled", "transformers"):
        assert results["train"][name]["seconds"] > 0 and results["train"][name]["mfu_measured"] > 0, name
        assert results["decode"][name] > 0 and results["decode"][f"{name}_fraction"]["measured"] > 0, name
    assert results["train"]["ours_vs_transformers"] > 0 and "FAILED" not in run.stdout
    assert "train ours_compiled / transformers: x" in run.stdout and "decode ours_compiled / transformers: x" in run.stdout
