"""``cli.py plot``: PNG plots from any run's CSV logs (and the demo's stage table).

- ``grpo_reward.png``: reward, accuracy reward and (when logged) held-out accuracy over GRPO steps.
- ``effective_share.png``: effective-sample share of the batch as sampled (what GRPO would train
  on without the buffer) and after the Selective Sample Buffer refilled it.
- ``mpo_losses.png``: the MPO loss terms and delta over steps.
- ``hallucination.png``: hallucination rate per stage (from a demo results JSON).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of a CSVLogger run as ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                try:
                    series.setdefault(k, []).append((step, float(v)))
                except ValueError:
                    continue
    return series


def _smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def _line(ax, series, key, label, smooth=True, **kw):
    pts = series.get(key)
    if not pts:
        return False
    xs, ys = zip(*pts)
    ax.plot(xs, _smooth(list(ys)) if smooth else ys, label=label, **kw)
    return True


def _save_step_plot(fig, ax, path: Path, ylabel: str, title: str) -> str:
    """Axes, limits and legend of a 0..1 metric over GRPO steps; saves ``path`` and closes ``fig``."""
    ax.set_xlabel("training step (one rollout batch)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_grpo(metrics_csv: str | Path, out_dir: str | Path) -> list[str]:
    s = read_metrics(metrics_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, s, "reward", "combined reward (train, mean of 5 logged steps)")
    _line(ax, s, "rewards/accuracy/mean", "accuracy reward (train, mean of 5 logged steps)")
    _line(ax, s, "val/accuracy", "held-out accuracy (greedy)", smooth=False, marker="o")
    written.append(_save_step_plot(fig, ax, out_dir / "grpo_reward.png", "reward / accuracy", "GRPO: reward and accuracy"))

    if s.get("effective_share"):
        fig, ax = plt.subplots(figsize=(7, 4))
        _line(ax, s, "effective_share", "without buffer (batch as sampled)")
        _line(ax, s, "ssb/effective_share_after", "with Selective Sample Buffer")
        ax.axhline(0.6, color="grey", ls="--", lw=1, label="60% (R1V2)")
        written.append(_save_step_plot(fig, ax, out_dir / "effective_share.png", "share of samples with |advantage| > 0",
                                       "Effective samples per GRPO batch (mean of 5 logged steps)"))
    return written


def plot_mpo(metrics_csv: str | Path, out_dir: str | Path) -> list[str]:
    s = read_metrics(metrics_csv)
    keys = [("train/loss/pref", "preference (DPO)"), ("train/loss/qual", "quality (BCO pair)"),
            ("train/loss/gen", "generation (SFT)"), ("train/loss", "total"), ("train/delta", "BCO shift delta")]
    if not any(s.get(k) for k, _ in keys):
        return []
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for k, label in keys:
        _line(ax, s, k, label)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean of 5 logged steps)")
    ax.set_title("MPO loss terms")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(out_dir) / "mpo_losses.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def plot_stages(results: list[dict], out_dir: str | Path) -> list[str]:
    """Bar charts of accuracy and hallucination rate per stage."""
    colours = {"majority answer": "#999999", "SFT": "#4c72b0", "MPO": "#55a868", "GRPO": "#c44e52"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "accuracy", "held-out accuracy"), (axes[1], "hallucination", "hallucination rate")):
        rows = [r for r in results if r.get(key) is not None]  # the baseline has no hallucination rate
        stages, vals = [r["stage"] for r in rows], [r[key] for r in rows]
        bars = ax.bar(stages, vals, color=[colours.get(s, "#8172b2") for s in stages])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.1%}", ha="center", fontsize=9)
        ax.set_title(title)
        ax.set_ylabel("share of held-out answers")
        ax.set_ylim(0, max(1.0, max(vals) + 0.1))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per stage, same held-out set")
    fig.tight_layout()
    path = Path(out_dir) / "stages.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def plot(run: str = "runs", out: str | None = None, results: str | None = None) -> list[str]:
    """Write PNG plots of a run's logs.

    Args:
        run: A run folder (``runs/grpo``, ``runs/mpo``) or a parent of several (``runs``): each
            ``grpo``/``mpo`` folder found is plotted from its newest ``metrics.csv``.
        out: Output folder for the PNGs (default: ``<run>/plots``).
        results: A demo results JSON (list of per-stage metrics) for the per-stage plot.
    """
    root = Path(run)
    out_dir = Path(out) if out else root / "plots"
    written: list[str] = []
    newest: dict[Path, Path] = {}  # run folder (holding logs/version_N/) -> its newest metrics.csv
    for m in sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        newest[m.parent.parent.parent] = m
    for m in newest.values():
        s = read_metrics(m)
        if "reward" in s:
            written += plot_grpo(m, out_dir)
        elif any(k.startswith("train/loss/") for k in s):
            written += plot_mpo(m, out_dir)
    if results:
        written += plot_stages(json.loads(Path(results).read_text()), out_dir)
    for w in written:
        print(f"plot: wrote {w}")
    if not written:
        print(f"plot: no GRPO or MPO metrics found under {run}")
    return written
