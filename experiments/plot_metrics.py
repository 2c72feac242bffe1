"""Turn a training run's JSON-lines metrics into a loss-curve PNG.

    python -m experiments.plot_metrics --metrics=workdir/run/metrics.jsonl [--out=loss.png]

Each line is a JSON object with at least `step` and `loss` (the training scripts also write `lr`,
`grad_norm`, `tokens_per_s`, `skipped`); lines with other keys only (summaries) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from experiments import cli
from experiments.cli import main_guard
from mistral_fn.atomic import atomic_file
from mistral_fn.errors import InputError

_METRICS = flags.DEFINE_string("metrics", None, "JSON-lines metrics file written by a training script")
_OUT = flags.DEFINE_string("out", None, "PNG to write (default: next to the metrics, loss.png)")
_TITLE = flags.DEFINE_string("title", None, "plot title (default: the metrics file's folder name)")


def read_metrics(path: str | Path) -> list[dict]:
    """The step records (objects with `step` and `loss`) of a JSON-lines file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such metrics file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); expected the JSON lines a training run "
                         "writes") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if isinstance(record, dict) and "step" in record and "loss" in record:
            records.append(record)
    if not records:
        raise InputError(f"{path}: no records with 'step' and 'loss'")
    return records


def plot_loss(records: list[dict], out: str | Path, title: str = "") -> Path:
    """Write a PNG of loss (and learning rate when present) against step; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in records):
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in records], [r["lr"] for r in records], color="tab:orange", alpha=0.6)
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


@main_guard
def main(argv):
    del argv
    if not _METRICS.value:
        raise InputError("--metrics is required")
    metrics = Path(_METRICS.value)
    records = read_metrics(metrics)
    out = plot_loss(records, _OUT.value or metrics.with_name("loss.png"), _TITLE.value or metrics.parent.name)
    print(f"{out}: {len(records)} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}")


if __name__ == "__main__":
    cli.run(main)
