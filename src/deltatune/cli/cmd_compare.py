"""`deltatune compare`: train every method on the same model, data and step budget, and tabulate them.

Writes in the output folder: `comparison.md` and `comparison.csv` (method, trainable params, trainable %,
seconds per step, peak memory, eval loss, exact-match), `loss_curves.png` (training loss of every method)
and `quality_vs_params.png` (eval loss and exact-match against trainable parameters) — the tutorials' table of
methods, measured live. Each method runs in a fresh process by default so that peak memory is its own.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from deltatune.cli import setup_logging
from deltatune.cli.methods import METHODS
from deltatune.cli.options import TrainOptions, make_options
from deltatune.cli.runs import is_run_folder
from deltatune.core.files import atomic_write_text

logger = logging.getLogger(__name__)

COLUMNS = [
    "method",
    "trainable_params",
    "trainable_percent",
    "seconds_per_step",
    "peak_memory_mb",
    "eval_loss",
    "exact_match",
]


@dataclass
class Row:
    """One method's measurements (error: why it could not run on this model)."""

    method: str
    trainable_params: int | None = None
    trainable_percent: float | None = None
    seconds_per_step: float | None = None
    peak_memory_mb: float | None = None
    eval_loss: float | None = None
    exact_match: float | None = None
    error: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)


def run_one(values: dict[str, Any]) -> Row:
    """Train one method with these options, then score exact-match on the held-out split."""
    # Imported when a run starts: these load the command line's extras (datasets) and transformers' Trainer.
    from deltatune.cli.cmd_eval import evaluate
    from deltatune.cli.cmd_train import train

    options = make_options(values)
    try:
        result = train(options)
        scores = evaluate(
            options.output,
            data=options.eval_data,
            cache_dir=options.cache_dir,
            trust_remote_code=options.trust_remote_code,
        )
    except (ValueError, TypeError, RuntimeError, OSError, NotImplementedError) as err:
        logger.error("%s failed: %s", options.method, err)
        return Row(options.method, error=f"{type(err).__name__}: {err}")
    return Row(
        options.method,
        result.trainable_params,
        result.trainable_percent,
        result.seconds_per_step,
        result.peak_memory_mb,
        scores.eval_loss,
        scores.exact_match,
        losses=[(h["step"], h["loss"]) for h in result.history],
    )


def _run_isolated(values: dict[str, Any]) -> Row:
    """run_one in a fresh Python process (its peak memory is then this method's alone)."""
    code = "import json,sys; from deltatune.cli.cmd_compare import worker; worker(json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(values)], stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("DELTATUNE_ROW ")]
    if done.returncode != 0 or not lines:
        return Row(values["method"], error=f"the training process exited with code {done.returncode}")
    row = json.loads(lines[-1][len("DELTATUNE_ROW ") :])
    row["losses"] = [tuple(pair) for pair in row["losses"]]
    return Row(**row)


def worker(values: dict[str, Any]) -> None:
    """The isolated process of `_run_isolated`: run one method and print its row for the parent to read."""
    setup_logging()
    print("DELTATUNE_ROW " + json.dumps(asdict(run_one(values))), flush=True)


def compare(
    options: TrainOptions | dict[str, Any], methods: list[str] | None = None, isolate: bool = True
) -> list[Row]:
    """Train each method (default: all in the table) with the same options; write the table and plots.

    `options.output` is the comparison folder; each method's run goes to a sub-folder named after it.
    """
    base = options if isinstance(options, TrainOptions) else make_options(options)
    base.check()
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if base.max_steps is None:
        raise ValueError("compare needs --max-steps: every method gets the same step budget")
    if base.data is not None and base.eval_data is None:
        raise ValueError("compare scores every method on held-out data: pass --eval-data with --data")
    unread = sorted(
        k for k, v in base.method_options.items() if v is not None and not any(k in METHODS[m].options for m in methods)
    )
    if unread:
        raise ValueError(
            f"{', '.join('--' + k.replace('_', '-') for k in unread)} does not apply to any method compared "
            f"({', '.join(methods)}); leave it out or add a method that reads it"
        )
    check_output(base.output, methods, base.overwrite)
    rows = []
    for method in methods:
        values = {
            **base.to_yaml_dict(),
            "method": method,
            "output": os.path.join(base.output, method),
            "overwrite": True,
        }
        for key in base.method_options:  # a method option goes only to the methods that read it
            if key not in METHODS[method].options:
                values.pop(key, None)
        logger.info("compare: training %s (%d/%d)", method, len(rows) + 1, len(methods))
        rows.append(_run_isolated(values) if isolate else run_one(values))
    write_outputs(rows, base.output)
    return rows


def check_output(folder: str, methods: list[str], overwrite: bool) -> None:
    """Refuse to replace a train run, or the runs of an earlier comparison, without --overwrite."""
    if is_run_folder(folder):
        raise FileExistsError(f"--output {folder} holds a train run; give compare a folder of its own")
    held = [m for m in methods if is_run_folder(os.path.join(folder, m))]
    if held and not overwrite:
        raise FileExistsError(
            f"--output {folder} already holds runs of {', '.join(held)}; pass --overwrite to replace "
            "them, or choose another --output"
        )


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    formats = {
        "trainable_params": "{:,d}",
        "trainable_percent": "{:.4f}",
        "seconds_per_step": "{:.3f}",
        "peak_memory_mb": "{:.0f}",
        "eval_loss": "{:.4f}",
        "exact_match": "{:.1%}",
    }
    return formats.get(column, "{}").format(value)


def write_outputs(rows: list[Row], folder: str) -> None:
    """comparison.md, comparison.csv and the two PNG plots."""
    os.makedirs(folder, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS + ["error"])
    for row in rows:
        writer.writerow([getattr(row, c) if getattr(row, c) is not None else "" for c in COLUMNS] + [row.error or ""])
    atomic_write_text(os.path.join(folder, "comparison.csv"), buffer.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| " + " | ".join(_fmt(getattr(row, c), c) if c != "method" else row.method for c in COLUMNS) + " |"
        for row in rows
    ]
    notes = [f"- {row.method}: {row.error}" for row in rows if row.error]
    text = (
        "# Methods compared\n\n" + "\n".join(lines) + "\n" + ("\nNot run:\n" + "\n".join(notes) + "\n" if notes else "")
    )
    text += "\n![loss curves](loss_curves.png)\n![quality against trainable parameters](quality_vs_params.png)\n"
    atomic_write_text(os.path.join(folder, "comparison.md"), text)
    plot(rows, folder)


def plot(rows: list[Row], folder: str) -> None:
    """loss_curves.png and quality_vs_params.png (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row.error is None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in done:
        ax.plot([s for s, _ in row.losses], [v for _, v in row.losses], marker=".", label=row.method)
    ax.set(xlabel="step", ylabel="training loss (response tokens)", title="Loss curves", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_curves.png"), dpi=120)
    plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for row in done:
        left.scatter(row.trainable_params, row.eval_loss)
        left.annotate(row.method, (row.trainable_params, row.eval_loss))
        right.scatter(row.trainable_params, 100 * row.exact_match)
        right.annotate(row.method, (row.trainable_params, 100 * row.exact_match))
    left.set(xscale="log", xlabel="trainable parameters", ylabel="held-out eval loss", title="Eval loss")
    right.set(xscale="log", xlabel="trainable parameters", ylabel="exact-match (%)", title="Exact-match")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "quality_vs_params.png"), dpi=120)
    plt.close(fig)
