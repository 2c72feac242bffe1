"""The main job runs every stage end to end (few pretraining steps, to keep the suite short)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_all_stages(tmp_path):
    """With --hf_dir of a model that is not a preset (ffn 192) every stage takes its config from the directory;
    on four of the sample's rows the fine-tuned model answers an instruction with its trained response."""
    import checkpoints
    import mistral_fn as mf
    from mistral_fn.tokenizer import default_tokenizer_path
    cfg = mf.MistralConfig.tiny().replace(ffn_dim=192)
    checkpoints.save_hf(tmp_path / "hf", cfg, mf.init_params(cfg, seed=1), tokenizer=default_tokenizer_path())
    rows = (ROOT / "experiments" / "data" / "alpaca_sample.jsonl").read_text().splitlines()[:4]
    (tmp_path / "four.jsonl").write_text("\n".join(rows) + "\n")
    run = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path / 'work'}",
                          f"--hf_dir={tmp_path / 'hf'}", f"--data={tmp_path / 'four.jsonl'}", "--pretrain_iters=4",
                          "--finetune_iters=100", "--finetune_batch_size=4", "--lora_iters=2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    work = tmp_path / "work"
    assert "all 9 stages succeeded" in run.stdout and "round trip bit-exact: True" in run.stdout
    assert "dim 64, layers 2, heads 4/2 kv" in run.stdout
    _, trained = checkpoints.load(work / "finetune")
    assert trained["layers"][1]["mlp"]["w_gate"].shape == (192, 64)
    answer = next(line for line in run.stdout.splitlines() if line.startswith("full: prompt"))
    assert answer.startswith("full: prompt 'Give three tips for staying healthy.' -> '1. Eat a balanced diet."), answer
    assert "the answer starts with it: yes" in run.stdout
    assert "LoRA vs full fine-tuning: trainable params" in run.stdout
    assert (work / "finetune_lora_peft" / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 3, 4, 5]  # resumes the converted checkpoint's iteration 1
    for name in ("mmlu_modellink.json", "mmlu_harness.json"):
        results = json.loads((work / name).read_text())
        assert 0.0 <= results["accuracy"] <= 1.0 and len(results["predictions"]) == 19
    assert (work / "pretrain_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_bad_path_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path}",
                          f"--hf_dir={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "missing" in run.stderr
