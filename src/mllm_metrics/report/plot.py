"""The report's picture: bit- and exact-match against the step, per group (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mllm_metrics.report.metrics import summarize
from mllm_metrics.report.records import RecordsFile
from mllm_metrics.report.series import group_series

__all__ = ["DEMO_EXTRA", "curve_sets", "plot_report"]

#: What to install for the picture.
DEMO_EXTRA = 'pip install "mllm-metrics[demo]"'


def curve_sets(files: Sequence[RecordsFile]) -> list[tuple[str, list[RecordsFile]]]:
    """The evaluations that one line may join, each with a short name: one per run of an eval set.

    Lines must not join evaluations of different eval sets or runs: each such set of
    evaluations is drawn (and named) apart.

    Args:
        files: what :func:`load_records` returned.

    Returns:
        ``(name, files sorted by step)`` per series, eval set and run: ``"val"``, ``"val dl1"``,
        ``"eval (calls)"``, with ``" set 2"`` and ``" run 2"`` when a series has several.

    Examples:
        >>> record = {"index": 0, "supervised_tokens": 2, "correct_tokens": 1, "exact": False,
        ...           "nll": 1.0}
        >>> files = [RecordsFile("val", s, "step", d, Path(f"{s}{d}"), [record])
        ...          for s, d in ((10, None), (20, None), (10, 1))]
        >>> [(name, [f.step for f in members]) for name, members in curve_sets(files)]
        [('val', [10, 20]), ('val dl1', [10])]
    """
    result = []
    for series in group_series(files):
        name = series.stage + ("" if series.dataloader is None else f" dl{series.dataloader}")
        name += " (calls)" if series.kind == "call" else ""
        for eval_set in series.eval_sets:
            for run in eval_set.runs:
                label = name + (f" set {eval_set.number}" if eval_set.of > 1 else "")
                label += f" run {run.number}" if len(eval_set.runs) > 1 else ""
                result.append((label, run.files))
    return result


def plot_report(files: Sequence[RecordsFile], out_png: str | Path, dpi: int = 150) -> Path:
    """Draw bit-match and exact-match against the step, one line per group and ``all``.

    Two panels (bit-match, exact-match); with several stages or dataloaders, eval sets or runs
    (:func:`curve_sets`), each line's label starts with its name (``val``, ``val dl1``...).

    Args:
        files: what :func:`load_records` returned.
        out_png: where to write the PNG (its directory is created when missing).
        dpi: resolution of the PNG.

    Returns:
        ``out_png`` as a :class:`~pathlib.Path`.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed (the message says what to install).

    Examples:
        >>> import tempfile
        >>> record = {"index": 0, "supervised_tokens": 2, "correct_tokens": 1, "exact": False,
        ...           "nll": 1.0}
        >>> file = RecordsFile("val", 10, "step", None, Path("val_step0000010.jsonl"), [record])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     png = plot_report([file], Path(tmp, "report.png"))
        ...     png.read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            f"Drawing the report needs matplotlib, which is not installed: {DEMO_EXTRA}",
            name="matplotlib",
        ) from None
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    all_sets = curve_sets(files)
    # A bare Figure on an Agg canvas: no pyplot state, no open window, nothing to close.
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    bit_ax, exact_ax = fig.subplots(1, 2, sharex=True)
    colors: dict[str, str] = {}
    styles = ("-", "--", ":", "-.")
    for number, (set_name, series) in enumerate(all_sets):
        prefix = f"{set_name}: " if len(all_sets) > 1 else ""
        steps = [file.step for file in series]
        summaries = [summarize(file.records) for file in series]
        names = ["all", *sorted({name for s in summaries for name in s.groups})]
        for name in names:
            color = colors.setdefault(name, "black" if name == "all" else f"C{len(colors) % 10}")
            if name == "all":
                points = [s.overall for s in summaries]
            else:
                points = [s.groups.get(name) for s in summaries]
            for ax, attribute in ((bit_ax, "bit_match"), (exact_ax, "exact_match")):
                values = [math.nan if p is None else getattr(p, attribute) for p in points]
                ax.plot(
                    steps,
                    values,
                    styles[number % len(styles)],
                    marker="o",
                    color=color,
                    lw=2.5 if name == "all" else 1.6,
                    ms=4,
                    label=prefix + name,
                )
    kinds = {file.kind for file in files}
    # Call counters are no steps: the label says so when both share the axis.
    xlabel = "step (or evaluation call)"
    if len(kinds) == 1:
        xlabel = "step" if kinds == {"step"} else "evaluation call"
    for ax, title in ((bit_ax, "bit-match (tokens)"), (exact_ax, "exact-match (samples)")):
        ax.set_title(title, fontsize=13)
        ax.set_xlabel(xlabel, fontsize=12)
        ax.set_ylabel("accuracy", fontsize=12)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
    if bit_ax.lines:
        fig.legend(
            handles=bit_ax.lines,
            loc="outside lower center",
            ncols=min(len(bit_ax.lines), 5),
            fontsize=11,
            frameon=False,
        )
    fig.suptitle("mllm-metrics report", fontsize=14)
    fig.savefig(out_png, dpi=dpi)
    return out_png
