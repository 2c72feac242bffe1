"""The main job runs every stage end to end (few steps, to keep the suite short)."""

import pytest
import json
import subprocess
import sys


@pytest.mark.slow
def test_quickstart_all_stages(tmp_path):
    run = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path}", "--pretrain_iters=4",
                          "--finetune_iters=2", "--lora_iters=2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "all 9 stages succeeded" in run.stdout and "round trip bit-exact: True" in run.stdout
    assert "LoRA vs full fine-tuning: trainable params" in run.stdout
    assert (tmp_path / "finetune_lora_peft" / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 3, 4, 5]  # resumes the converted checkpoint's iteration 1
    for name in ("mmlu_modellink.json", "mmlu_harness.json"):
        results = json.loads((tmp_path / name).read_text())
        assert 0.0 <= results["accuracy"] <= 1.0 and len(results["predictions"]) == 19
    assert (tmp_path / "pretrain_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_bad_path_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path}",
                          f"--hf_dir={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "missing" in run.stderr
