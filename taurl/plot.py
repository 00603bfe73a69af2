"""``taurl plot RUN_DIR``: learning curves from ``metrics.jsonl`` as PNG files."""

from __future__ import annotations

from pathlib import Path

from taurl.diagnose import read_metrics

#: (metric key, panel title) of the curves `taurl plot` draws, when present in the run.
PANELS: tuple[tuple[str, str], ...] = (
    ("rollout/return", "train return"),
    ("rollout/success", "train success"),
    ("eval/success", "held-out success"),
    ("traj/approx_kl", "KL (learner vs sampler)"),
    ("traj/clip_frac", "clip fraction"),
    ("reward/zero_var_groups", "zero-variance groups"),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every available panel of PANELS into one PNG (default ``RUN_DIR/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    present = [(k, t) for k, t in PANELS if any(k in r for r in rows)]
    if not present:
        raise ValueError(
            f"{run_dir}/metrics.jsonl has none of the plotted metrics {[k for k, _ in PANELS]}"
        )
    cols = min(3, len(present))
    nrows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        pts = [(r.get("iteration", i), r[key]) for i, r in enumerate(rows) if key in r]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
