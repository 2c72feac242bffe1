"""plot_metrics: JSON lines -> PNG, bad files named."""

import json
import subprocess
import sys

import pytest

from experiments.plot_metrics import plot_loss, read_metrics
from mistral_fn.errors import InputError


def test_plot_from_jsonl(tmp_path):
    lines = [json.dumps({"step": i, "loss": 5.0 / (i + 1), "lr": 1e-3}) for i in range(10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"summary": True})]) + "\n")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10))
    out = plot_loss(records, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_writes_png_and_rejects_bad_files(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    run = subprocess.run([sys.executable, "-m", "experiments.plot_metrics", f"--metrics={tmp_path / 'm.jsonl'}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "loss.png").exists() and "2 steps" in run.stdout
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    run = subprocess.run([sys.executable, "-m", "experiments.plot_metrics", f"--metrics={tmp_path / 'bad.jsonl'}"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().startswith("error:") and "bad.jsonl:2" in run.stderr
    with pytest.raises(InputError, match="no records"):
        (tmp_path / "empty.jsonl").write_text("")
        read_metrics(tmp_path / "empty.jsonl")
