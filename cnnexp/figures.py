"""Figures rendered from a run's saved files alone (CSVs and the sample npz),
so they can be redrawn anywhere with `python -m cnnexp.plot DIR`.

matplotlib and pandas are imported when the first figure is drawn, so a job
that draws none (trainer.plots=none) never pays for them. Figures are drawn on
plain `Figure` objects (no pyplot state to clean up), with fixed margins where
the labels are known, and the prediction samples as one image: drawing the
figures is most of the time between a short run's last epoch and its exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cnnexp.errors import DiskFull
from cnnexp.results.files import CONFUSION_FILE, METRICS_FILE, PER_CLASS_FILE, SAMPLES_FILE
from cnnexp.results.metrics import read_metrics
from cnnexp.results.objective import selected_row
from cnnexp.safeio import atomic_path

if TYPE_CHECKING:
    import pandas as pd

# trainer.plots: every figure, only the overview of the curves, or none.
PLOTS = ("all", "final", "none")
DPI = 110

# The original experiment plotted one figure per metric.
METRIC_FIGURES = {
    "train_loss": ("Training loss (mean per epoch)", "loss", 1.0),
    "test_loss": ("Test loss", "loss", 1.0),
    "train_acc": ("Training accuracy", "accuracy (%)", 100.0),
    "test_acc": ("Test accuracy", "accuracy (%)", 100.0),
}
# With a validation split (data.val_size): its own figures, and its curves beside the test ones.
VAL_FIGURES = {
    "val_loss": ("Validation loss", "loss", 1.0),
    "val_acc": ("Validation accuracy", "accuracy (%)", 100.0),
}


def __getattr__(name: str):
    """`figures.plt`: pyplot on the file-only backend, for code that draws with pyplot."""
    if name == "plt":
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt

        return plt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _figure(figsize: tuple[float, float], rows: int = 1, columns: int = 1):
    """A new figure and its axes. No pyplot: no backend to pick, nothing global to close."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, columns, squeeze=rows * columns == 1)


# Margins of the curve figures, whose labels are always the same: no layout pass needed.
CURVE_MARGINS = dict(left=0.12, right=0.97, bottom=0.12, top=0.91)
OVERVIEW_MARGINS = dict(left=0.07, right=0.985, bottom=0.075, top=0.95, wspace=0.22, hspace=0.35)


# About the width of one character of a 10-point tick label: margins for the class names,
# computed instead of measured (a layout pass draws the whole figure once more).
CHAR_INCHES = 0.085


def _margins(width: float, height: float, left: float, bottom: float, top: float, right: float) -> dict:
    """subplots_adjust fractions from margins in inches (at most half the figure each way)."""
    return dict(left=min(left / width, 0.5), right=1 - min(right / width, 0.4),
                bottom=min(bottom / height, 0.5), top=1 - min(top / height, 0.4))


def _selected_epoch(metrics: pd.DataFrame) -> int | None:
    """The epoch a run with a validation split selects (results/objective.py)."""
    best = selected_row(metrics.to_dict("records"))
    return None if best is None else int(best["epoch"])


def _whole_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_selected(ax, epoch: int | None) -> None:
    if epoch is not None:
        ax.axvline(epoch, color="gray", linestyle="--", linewidth=1, label=f"selected (epoch {epoch})")


def _save(fig, path: Path, margins: dict | None = None) -> Path:
    """Write fig as path, atomically; `margins` replace the layout pass (which draws the figure once more)."""
    if margins is None:
        fig.tight_layout()
    else:
        fig.subplots_adjust(**margins)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # never half a PNG
        fig.savefig(f, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    return path


def render_run(run_dir: Path, problems: list[str] | None = None, plots: str = "all") -> list[Path]:
    """Render the figures whose inputs exist in run_dir into run_dir/plots:
    every figure (plots="all"), only overview.png ("final") or none ("none").

    A half-written, damaged or older run is drawn as far as it goes: what
    could not be drawn, and why, is added to `problems` (if given)."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    problems = [] if problems is None else problems
    written = []
    if plots == "none":
        return written
    metrics, problem = read_metrics(run_dir / METRICS_FILE)
    if problem:
        problems.append(problem)
    if metrics is not None:
        written += render_metric_figures(metrics, out, each=plots == "all")
    if plots != "all":
        return written
    for name, draw, figure in ((CONFUSION_FILE, plot_confusion, "confusion_matrix.png"),
                               (PER_CLASS_FILE, plot_per_class, "per_class_accuracy.png"),
                               (SAMPLES_FILE, plot_predictions, "predictions.png")):
        if not (run_dir / name).is_file():
            continue
        try:
            written.append(draw(run_dir / name, out / figure))
        except DiskFull:
            raise
        except Exception as err:  # a damaged file: skip its figure, draw the rest
            problems.append(f"{name} cannot be drawn ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return written


def render_metric_figures(metrics: pd.DataFrame, out: Path, each: bool = True) -> list[Path]:
    """One figure per metric the file has (`each`), and the overview of those.
    The single-metric figures share one figure object, redrawn per metric."""
    selected = _selected_epoch(metrics)
    figures = {**METRIC_FIGURES, **(VAL_FIGURES if selected is not None else {})}
    present = {c: spec for c, spec in figures.items() if c in metrics and metrics[c].notna().any()}
    written = []
    if each and present:
        fig, ax = _figure((6, 4))
        for column, (title, ylabel, scale) in present.items():
            ax.clear()
            ax.plot(metrics["epoch"], metrics[column] * scale, marker="o", markersize=3)
            _whole_epochs(ax)
            if column in VAL_FIGURES:
                _mark_selected(ax, selected)
                ax.legend(fontsize=8)
            ax.set(title=title, xlabel="epoch", ylabel=ylabel)
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / f"{column}.png", CURVE_MARGINS))
    overview = {c: spec for c, spec in METRIC_FIGURES.items() if c in present}
    if not overview:
        return written
    fig, axes = _figure((10, 7), 2, 2)
    for ax in axes.flat[len(overview):]:
        ax.axis("off")
    for ax, (column, (title, ylabel, scale)) in zip(axes.flat, overview.items()):
        ax.plot(metrics["epoch"], metrics[column] * scale, marker="o", markersize=2, label=column.split("_")[0])
        val_column = column.replace("test_", "val_")
        if selected is not None and column.startswith("test_") and val_column in metrics:
            ax.plot(metrics["epoch"], metrics[val_column] * scale, marker="o", markersize=2, label="validation")
            title = title.replace("Test", "Test and validation")
        _whole_epochs(ax)
        if selected is not None:
            _mark_selected(ax, selected)
            ax.legend(fontsize=7)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    written.append(_save(fig, out / "overview.png", OVERVIEW_MARGINS))
    return written


def plot_confusion(path: Path, out: Path) -> Path:
    import pandas as pd

    table = pd.read_csv(path, index_col=0)
    counts = table.to_numpy()
    n = len(table)
    fig, ax = _figure((1.0 + 0.6 * n, 0.8 + 0.55 * n))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), table.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), table.index)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({int(counts.sum())} test images)")
    high = counts.max() / 2 if counts.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > high else "black")
    width, height = fig.get_size_inches()
    longest = max((len(str(name)) for name in [*table.columns, *table.index]), default=1)
    return _save(fig, out, _margins(width, height, left=0.5 + CHAR_INCHES * longest,
                                    bottom=0.55 + 0.71 * CHAR_INCHES * longest, top=0.35, right=0.15))


def plot_per_class(path: Path, out: Path) -> Path:
    import pandas as pd

    table = pd.read_csv(path)
    fig, ax = _figure((max(6, 0.6 * len(table)), 4))
    ax.bar(table["class"], table["accuracy"] * 100, color="tab:blue")
    mean = table["correct"].sum() / table["total"].sum() * 100
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"overall {mean:.1f} %")
    ax.set(ylabel="test accuracy (%)", title="Test accuracy per class", ylim=(0, 100))
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    width, height = fig.get_size_inches()
    longest = max((len(str(name)) for name in table["class"]), default=1)
    return _save(fig, out, _margins(width, height, left=0.65, bottom=0.35 + 0.71 * CHAR_INCHES * longest,
                                    top=0.35, right=0.15))


def sample_mosaic(images, columns: int, hpad: int, vpad: int):
    """The sample images (N, C, H, W) tiled into one picture on a white background,
    `columns` cells a row; each cell is an image with `vpad` rows of room above it
    (for its caption) and `hpad` columns beside it. One image draws much faster
    than one axes per sample."""
    import numpy as np

    n, channels, height, width = images.shape
    rows = -(-n // columns)
    cell_h, cell_w = height + vpad, width + hpad
    mosaic = np.full((rows * cell_h, columns * cell_w, channels), 255 if images.dtype == np.uint8 else 1.0,
                     dtype=images.dtype)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        top, left = r * cell_h + vpad, c * cell_w + hpad // 2
        mosaic[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return mosaic[..., 0] if channels == 1 else mosaic


def plot_predictions(path: Path, out: Path, columns: int = 8) -> Path:
    import numpy as np

    sample = np.load(path)
    images, labels, preds, classes = sample["images"], sample["labels"], sample["predictions"], sample["classes"]
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    fig, ax = _figure((1.6 * columns, 1.9 * rows + 0.3))
    ax.axis("off")
    if len(images):
        height, width = images.shape[2:]
        hpad, vpad = round(width / 3), round(height * 0.6)  # a cell of 1.6 x 1.9 inches, as one axes per image had
        ax.imshow(sample_mosaic(images, columns, hpad, vpad), cmap="gray", interpolation="nearest",
                  extent=(0, columns * (width + hpad), rows * (height + vpad), 0))
        for k, (label, pred) in enumerate(zip(labels, preds)):
            r, c = divmod(k, columns)
            ax.text((c + 0.5) * (width + hpad), r * (height + vpad) + vpad - 1,
                    f"{classes[label]}\n→ {classes[pred]}", fontsize=7, ha="center", va="bottom",
                    color="tab:green" if label == pred else "tab:red")
    fig.suptitle("Test images: true class → predicted (green right, red wrong)", fontsize=9)
    return _save(fig, out, margins=dict(left=0.005, right=0.995, bottom=0.005, top=1 - 0.3 / (1.9 * rows + 0.3)))


# ----------------------------------------------------------------- sweeps
SWEEP_FIGURES = {
    "test_acc": ("Test accuracy", "accuracy (%)", 100.0),
    "test_loss": ("Test loss", "loss", 1.0),
    "train_loss": ("Training loss", "loss", 1.0),
    "val_acc": ("Validation accuracy", "accuracy (%)", 100.0),  # drawn when the jobs have a split
    "val_loss": ("Validation loss", "loss", 1.0),
}


def render_sweep(sweep_dir: Path, curves: dict[str, pd.DataFrame], groups: dict[str, list[str]] | None) -> list[Path]:
    """Comparison figures in the sweep root: one line per job (labelled by its
    overrides), or with seeds, one line per group with a +-std band."""
    import pandas

    written = []
    for column, (title, ylabel, scale) in SWEEP_FIGURES.items():
        if not any(column in frame for frame in curves.values()):
            continue
        fig, ax = _figure((7, 4.5))
        if groups:
            for label, members in groups.items():
                frames = [curves[m].set_index("epoch")[column] * scale for m in members
                          if m in curves and column in curves[m]]
                if not frames:
                    continue
                stacked = pandas.concat(frames, axis=1)
                mean, std = stacked.mean(axis=1), stacked.std(axis=1, ddof=1).fillna(0.0)  # sample std, as in summary.csv
                line = ax.plot(mean.index, mean, label=f"{label} (n={len(frames)})")[0]
                ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=line.get_color())
        else:
            for label, frame in curves.items():
                if column not in frame:  # a job from an older cnnexp
                    continue
                ax.plot(frame["epoch"], frame[column] * scale, marker="o", markersize=2, label=label)
        ax.set(title=title + (" (mean ± std over seeds)" if groups else ""), xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        written.append(_save(fig, sweep_dir / f"compare_{column}.png"))
    return written


# The original experiment's two published runs, read off its plots (test accuracy in %).
ORIGINAL_TEST_ACC = {
    "run A": {"epoch 1": 48.0, "best": 64.3, "best epochs": "8, 12-13", "epoch 50": 60.2},
    "run B": {"epoch 1": 45.5, "best": 62.5, "best epochs": "8-9", "epoch 50": 56.7},
}


def plot_against_original(metrics: pd.DataFrame, out: Path) -> Path:
    """Test accuracy per epoch beside the original experiment's published range."""
    runs = ORIGINAL_TEST_ACC.values()
    best = (min(r["best"] for r in runs), max(r["best"] for r in runs))
    last = (min(r["epoch 50"] for r in runs), max(r["epoch 50"] for r in runs))
    first = (min(r["epoch 1"] for r in runs), max(r["epoch 1"] for r in runs))
    fig, ax = _figure((7, 4.5))
    ax.plot(metrics["epoch"], metrics["test_acc"] * 100, marker="o", markersize=3, label="cnnexp", zorder=3)
    ax.fill_between([7.5, 13.5], *best, color="tab:green", alpha=0.2, label=f"original best {best[0]}-{best[1]} %")
    ax.fill_between([48, 50.5], *last, color="tab:orange", alpha=0.3,
                    label=f"original at epoch 50: {last[0]}-{last[1]} %")
    ax.fill_between([0.5, 1.5], *first, color="tab:purple", alpha=0.3,
                    label=f"original at epoch 1: {first[0]}-{first[1]} %")
    ax.set(title="Test accuracy against the original experiment (runs A and B)", xlabel="epoch",
           ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)
