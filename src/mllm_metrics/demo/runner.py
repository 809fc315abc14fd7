"""The demo's run: build the model and data, describe one batch, train, write and draw.

:func:`run_demo` is what ``mllm-metrics demo`` calls (see :mod:`mllm_metrics.demo.cli` for the
command line). It trains with :mod:`mllm_metrics.demo.lightning_backend` or
:mod:`mllm_metrics.demo.hf_backend` and writes to ``--out``: ``metrics.csv``, ``table.md``,
``metrics.png`` (when matplotlib is installed) and ``records/``, the per-sample records of every
validation (read by ``mllm-metrics report``). This module needs the ``[demo]`` extra (torch,
transformers, tokenizers, and Lightning or accelerate for the chosen back-end).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shlex
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_metrics.demo.config import (
    CSV_NAME,
    DEMO_EXTRA,
    METRIC_KEYS,
    PNG_NAME,
    TABLE_NAME,
    DemoConfig,
    DemoResult,
    missing_dependencies,
)
from mllm_metrics.demo.data import (
    BitImageCollator,
    BitImageDataset,
    char_tokenizer,
    grid_side,
)
from mllm_metrics.demo.model import IMAGE_TOKEN_INDEX, TinyLlavaForCausalLM, tiny_llava_config
from mllm_metrics.labels import aligned_forward

__all__ = [
    "build_data",
    "build_model",
    "describe_batch",
    "format_table",
    "plot_history",
    "run_demo",
    "write_csv",
]

# Noise that says nothing about the demo: DataLoader workers on a 2-core CPU, torch internals.
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*`max_epochs` was not set.*",
    # The Lightning module masks the rows DistributedSampler repeats: validation stays exact.
    ".*Using `DistributedSampler` with the dataloaders.*",
)


# ---- building blocks ---------------------------------------------------------------------------


def build_model(config: DemoConfig, tokenizer: Any) -> TinyLlavaForCausalLM:
    """Create the tiny LLaVA-style model for ``config`` (seeded by ``config.seed``).

    Args:
        config: the demo configuration.
        tokenizer: the demo's tokenizer (its size is the vocabulary size).

    Returns:
        A freshly initialised :class:`~mllm_metrics.demo.TinyLlavaForCausalLM`.
    """
    torch.manual_seed(config.seed)
    model_config = tiny_llava_config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.cell_size * config.patch_cells,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return TinyLlavaForCausalLM(model_config)


def build_data(config: DemoConfig) -> tuple[BitImageDataset, BitImageDataset]:
    """Create the training and validation sets of ``config`` (disjoint seeds).

    The training set holds ``max_steps * batch_size`` rows (at most 2**15, then it repeats) in
    a fixed order: step ``s`` trains on rows ``s * batch_size`` to ``(s + 1) * batch_size - 1``
    (the rows are random already, nothing is shuffled), with one process or several.

    Args:
        config: the demo configuration.

    Returns:
        ``(train, val)``.
    """
    train_size = min(config.max_steps * config.batch_size, 2**15)
    train_size -= train_size % config.batch_size
    kwargs = {
        "bits": config.bits,
        "cell_size": config.cell_size,
        "noise": config.noise,
        "side": config.grid,
    }
    train = BitImageDataset(max(train_size, config.batch_size), seed=config.seed, **kwargs)
    val = BitImageDataset(config.val_size, seed=config.seed + 7919, **kwargs)
    return train, val


def describe_batch(
    model: nn.Module, batch: Mapping[str, Any], tokenizer: Any, grid: int | None = None
) -> str:
    """Explain, on one batch, how the model's ``forward`` rewrites the labels.

    Runs one forward through :func:`mllm_metrics.labels.aligned_forward` and reports the data
    set's label shape, the processed label shape and how many image positions ``forward``
    inserted, with the first row drawn as text.

    Args:
        model: the LLaVA-style model.
        batch: a collated batch (``input_ids``, ``labels``, ``images``...), one image per row.
        tokenizer: the demo's tokenizer.
        grid: cells per side of the images; default the smallest square for the answer.

    Returns:
        A few lines of text.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = aligned_forward(model, batch)
    model.train(was_training)
    labels, processed = batch["labels"], result.labels
    if processed is None:
        raise ValueError("The batch has no `labels` to describe.")
    rows, length = labels.shape
    placeholders = int((batch["input_ids"][0] == IMAGE_TOKEN_INDEX).sum())
    added = processed.shape[1] - length  # per row, as every row has the same length here
    per_image = (added + placeholders) // max(placeholders, 1)
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    text = "".join(
        "<image>" if i == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(i) for i in first
    )
    answer = tokenizer.decode(labels[0][labels[0] != -100].tolist(), skip_special_tokens=True)
    side = grid or grid_side(len(answer))
    cells = answer.ljust(side * side, "?")
    drawn = " ".join(
        "".join({"1": "#", "0": "."}.get(c, "~") for c in cells[r * side : (r + 1) * side])
        for r in range(side)
    )
    return "\n".join(
        [
            f"The problem, on one batch of {rows} rows (row 0 shown):",
            f"  text             : {text}   (only the answer and </s> are supervised)",
            f"  image, {side}x{side} cells : {drawn}   (row by row; # = white = 1, . = black = 0)",
            f"  data set labels  : {tuple(labels.shape)}",
            f"  processed labels : {tuple(processed.shape)}, as the logits "
            f"{tuple(result.logits.shape)}",
            f"  forward replaced each <image> (id {IMAGE_TOKEN_INDEX}) by {per_image} image "
            f"positions labelled -100: {added:+d} positions per row.",
            f"  The data set's labels would be {added} positions off the logits: the metrics use "
            "the processed labels\n  (recorded during forward by "
            "mllm_metrics.labels.aligned_forward).",
        ]
    )


def format_table(history: Sequence[Mapping[str, float]]) -> str:
    """Format the validation history as a Markdown table (one row per validation).

    A value that is missing or nan (the ``gen_*`` columns of a run that does not generate,
    e.g. ``--backend hf``) shows as ``-``.

    Examples:
        >>> row = {"step": 0, "val/loss": 3.51, "val/bit_match": 0.1, "val/exact_match": 0.0}
        >>> header, rule, first = format_table([row]).splitlines()
        >>> header.startswith("| step | val/loss | val/bit_match | val/exact_match |")
        True
        >>> print(first)  # the text_* and gen_* values are missing here
        | 0 | 3.510 | 0.100 | 0.000 | - | - | - | - |
    """
    header = "| step | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|" + "---:|" * (len(METRIC_KEYS) + 1)
    rows = [
        f"| {int(row['step'])} | "
        + " | ".join(_table_cell(row.get(key)) for key in METRIC_KEYS)
        + " |"
        for row in history
    ]
    return "\n".join([header, rule, *rows])


def _table_cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def write_csv(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Write the history to ``path`` with the columns ``step`` and :data:`METRIC_KEYS`.

    A missing value is written as ``nan`` (``float()`` reads it back).
    """
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", *METRIC_KEYS], extrasaction="ignore")
        writer.writeheader()
        for row in history:
            values = {key: row.get(key, math.nan) for key in METRIC_KEYS}
            writer.writerow({"step": int(row["step"]), **values})
    return path


# Each teacher-forced token metric, its colour, and its twins: the free-running (greedy-decoding)
# value and the decoded-text value.
_TWINS = (
    ("val/bit_match", "tab:blue", "val/gen_bit_match", "val/text_bit_match"),
    ("val/exact_match", "tab:red", "val/gen_exact_match", "val/text_exact_match"),
)
# Teacher-forced: solid with dots; free-running: dashed with hollow squares (large enough to
# show the dots inside where both coincide); decoded text: dotted with crosses.
_STYLE = {
    "teacher": {"ls": "-", "marker": "o", "lw": 2, "ms": 4},
    "free": {"ls": "--", "marker": "s", "lw": 1.8, "ms": 7, "mfc": "none", "mew": 1.5},
    "text": {"ls": ":", "marker": "x", "lw": 2, "ms": 5},
}
# The differences: hollow squares for bit-match, small diamonds (drawn inside) for exact-match.
_GAP_STYLE = {
    "val/bit_match": _STYLE["free"],
    "val/exact_match": {"ls": "--", "marker": "D", "lw": 1.8, "ms": 4},
}
# Font sizes (points) that stay legible when the 150-dpi PNG is shown in a README.
_FONT = {"title": 13, "label": 12, "tick": 11, "legend": 10, "note": 11, "suptitle": 14}


def _values(history: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [float(row.get(key, math.nan)) for row in history]


def _pairs(
    history: Sequence[Mapping[str, float]], key: str, twin: str
) -> list[tuple[float, float]]:
    """``(value, twin value)`` of the validations that have both."""
    return [
        (a, b)
        for a, b in zip(_values(history, key), _values(history, twin), strict=True)
        if not (math.isnan(a) or math.isnan(b))
    ]


def _name(key: str) -> str:
    return key.removeprefix("val/")


def _coincidence_note(history: Sequence[Mapping[str, float]]) -> str:
    """Say how far each decoded-text metric is from its token twin (they often coincide)."""
    parts = []
    for key, _, _, text_key in _TWINS:
        pairs = _pairs(history, key, text_key)
        if not pairs:
            continue
        gap = max(abs(token - text) for token, text in pairs)
        if gap < 5e-4:  # equal to the 3 decimals of the table
            parts.append(f"{_name(text_key)} = {_name(key)} at all {len(pairs)} validations")
        else:
            parts.append(f"{_name(text_key)} within {gap:.3f} of {_name(key)}")
    return "decoded text vs tokens: " + ", ".join(parts) if parts else ""


def _free_running_note(history: Sequence[Mapping[str, float]]) -> str:
    """Say how the free-running values compare with the teacher-forced ones (one line each)."""
    lines = []
    for key, _, gen_key, _ in _TWINS:
        both = [
            (row["step"], row[gen_key] - row[key])
            for row in history
            if not math.isnan(row.get(key, math.nan) + row.get(gen_key, math.nan))
        ]
        if not both:
            continue
        steps, gaps = [step for step, _ in both], [gap for _, gap in both]
        below = [gap for gap in gaps if gap < -1e-9]
        above = [gap for gap in gaps if gap > 1e-9]
        if not below and not above:
            lines.append(f"{_name(gen_key)} = {_name(key)} at all {len(gaps)} validations")
            continue
        sides = []
        if below:
            worst = min(gaps)
            at = int(steps[gaps.index(worst)])
            sides.append(
                f"below at {len(below)} of {len(gaps)} validations (by up to {-worst:.3f}, at "
                f"step {at})"
            )
        if above:
            sides.append(f"above at {len(above)} (by at most {max(above):.3f})")
        lines.append(f"{_name(gen_key)} vs {_name(key)}: " + ", ".join(sides))
    return "\n".join(f"free-running {line}" for line in lines)


def plot_history(
    history: Sequence[Mapping[str, float]],
    path: Path | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Any:
    """Draw the validation curves against the step; save a PNG to ``path`` when given.

    Four panels, so that no curve hides another: the teacher-forced token metrics
    (``val/bit_match``, ``val/exact_match``, solid) with their free-running twins
    (``val/gen_bit_match``, ``val/gen_exact_match``, dashed, hollow markers: where a twin
    coincides, its markers ring the solid curve's); the free-running values minus the
    teacher-forced ones (0: equal); the decoded-text twins; and ``val/loss``. Notes under the
    panels say how close the twins are. A run without free-running values (``--backend hf``,
    generation off) leaves the difference panel empty, with a note.

    Args:
        history: one dict per validation (``step`` and :data:`METRIC_KEYS`).
        path: where to save the PNG; None only returns the figure.
        title: the figure's title.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.

    Examples:
        >>> rows = [{"step": 0, "val/loss": 3.5, "val/bit_match": 0.2, "val/exact_match": 0.0,
        ...          "val/text_bit_match": 0.2, "val/text_exact_match": 0.0,
        ...          "val/gen_bit_match": 0.1, "val/gen_exact_match": 0.0}]
        >>> [ax.get_title() for ax in plot_history(rows).axes]  # doctest: +NORMALIZE_WHITESPACE
        ['teacher-forced (solid) vs free-running (dashed)', 'free-running minus teacher-forced',
         'decoded-text metrics', 'val/loss']
    """
    # A bare Figure, not pyplot: no backend is chosen or changed, nothing stays open.
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    fig = Figure(figsize=(11, 8), layout="constrained")
    (token_ax, gap_ax), (text_ax, loss_ax) = fig.subplots(2, 2, sharex=True)
    for key, color, gen_key, text_key in _TWINS:
        teacher, free = _values(history, key), _values(history, gen_key)
        token_ax.plot(steps, teacher, color=color, label=key, **_STYLE["teacher"])
        token_ax.plot(steps, free, color=color, label=gen_key, **_STYLE["free"])
        gap = [b - a for a, b in zip(teacher, free, strict=True)]
        label = f"{gen_key} − {key}"
        gap_ax.plot(steps, gap, color=color, label=label, **_GAP_STYLE[key])
        text_ax.plot(
            steps, _values(history, text_key), color=color, label=text_key, **_STYLE["text"]
        )
    for ax, name in (
        (token_ax, "teacher-forced (solid) vs free-running (dashed)"),
        (text_ax, "decoded-text metrics"),
    ):
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy", fontsize=_FONT["label"])
        ax.set_title(name, fontsize=_FONT["title"])
    gap_ax.axhline(0.0, color="0.4", lw=1, zorder=0)
    gap_ax.set_ylabel("difference", fontsize=_FONT["label"])
    gap_ax.set_title("free-running minus teacher-forced", fontsize=_FONT["title"])
    if not any(_pairs(history, key, gen_key) for key, _, gen_key, _ in _TWINS):
        gap_ax.text(
            0.5,
            0.5,
            "no free-running values:\nthis run did not generate",
            transform=gap_ax.transAxes,
            ha="center",
            va="center",
            fontsize=_FONT["note"],
            color="0.3",
        )
    # The curves end near 1 (and the gaps near 0): the lower right corner is free.
    for ax in (token_ax, gap_ax, text_ax):
        ax.legend(loc="lower right", fontsize=_FONT["legend"], framealpha=0.9)
    loss_ax.plot(steps, _values(history, "val/loss"), "-o", color="k", ms=4, label="val/loss")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("mean token NLL", fontsize=_FONT["label"])
    loss_ax.set_title("val/loss", fontsize=_FONT["title"])
    for ax in (token_ax, gap_ax, text_ax, loss_ax):
        ax.tick_params(labelsize=_FONT["tick"])
        ax.tick_params(which="minor", labelsize=_FONT["tick"])
        ax.grid(alpha=0.3)
    for ax in (text_ax, loss_ax):
        ax.set_xlabel("step", fontsize=_FONT["label"])
    for ax in (token_ax, gap_ax):  # shared with the panel below
        ax.tick_params(labelbottom=True)
    notes = [note for note in (_free_running_note(history), _coincidence_note(history)) if note]
    if notes:  # under the panels, where they hide no curve
        fig.supxlabel("\n".join(notes), fontsize=_FONT["note"], color="0.2")
    if title:
        fig.suptitle(title, fontsize=_FONT["suptitle"])
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


# ---- the run -----------------------------------------------------------------------------------

# The records files the back-ends write (Lightning: val_..., Trainer: eval_...), and those
# being written.
_RECORDS_PATTERNS = tuple(
    f"{stage}_step*{suffix}" for stage in ("val", "eval") for suffix in (".jsonl", ".jsonl.partial")
)


def _records_files(directory: Path) -> list[Path]:
    """The demo's records files in ``directory``, sorted by name."""
    return sorted(path for pattern in _RECORDS_PATTERNS for path in directory.glob(pattern))


def _remove_old_records(directory: Path) -> None:
    """Remove an earlier run's records files (other steps, or the other back-end's), so that
    the directory holds this run's validations only."""
    for path in _records_files(directory):
        path.unlink()


def _records_line(directory: Path) -> str:
    """The last line of the run: the records written, and the command that reads them."""
    count = len([path for path in _records_files(directory) if path.suffix == ".jsonl"])
    files = "1 file" if count == 1 else f"{count} files"
    return f"Records: {files}; read them with mllm-metrics report {shlex.quote(str(directory))}"


def _generation_note(config: DemoConfig) -> str:
    """How the validations decode answers, after the training line."""
    if config.backend != "lightning" or config.max_new_tokens is None:
        return " (teacher-forced only)"
    return f" (teacher-forced, and free-running: greedy, <= {config.max_new_tokens} tokens)"


def _final_free_running(row: Mapping[str, float]) -> str:
    """`` (free-running: bit-match x, exact-match y)`` when the run generated, else empty."""
    values = [row.get(f"val/gen_{name}", math.nan) for name in ("bit_match", "exact_match")]
    if any(math.isnan(value) for value in values):
        return ""
    return f" (free-running: bit-match {values[0]:.3f}, exact-match {values[1]:.3f})"


def _is_rank_zero() -> bool:
    # Lightning's DDP launcher and torchrun set these in the processes they start.
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK"))


def run_demo(config: DemoConfig | None = None, **overrides: Any) -> DemoResult:
    """Run the demo: describe one batch, train, validate, write the CSV, the table and the PNG.

    Under ``devices > 1`` Lightning re-runs the current command in the other processes; every
    process trains, and only rank 0 prints and writes files.

    Args:
        config: the configuration; None uses :class:`DemoConfig`'s defaults.
        **overrides: fields of :class:`DemoConfig` to change.

    Returns:
        The history, the table and the paths of what was written (no PNG, and
        ``png_path=None``, when matplotlib is not installed: the run says so before training),
        with the records directory (an earlier run's records files there are removed first).

    Raises:
        ModuleNotFoundError: before anything runs, when the back-end's framework is missing.
    """
    config = dataclasses.replace(config or DemoConfig(), **overrides)
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        return _run(config)


def _use_threads(threads: int | None) -> int:
    """Set torch's threads for this process and the processes it starts (DDP re-runs the
    command, which reads ``OMP_NUM_THREADS``); return the number."""
    threads = threads or 1
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def _can_draw() -> bool:
    """Whether :func:`plot_history` can run (matplotlib is an extra of its own)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _run(config: DemoConfig) -> DemoResult:
    start = time.perf_counter()
    missing = missing_dependencies(config.backend)
    if missing:  # before anything is built or trained
        raise ModuleNotFoundError(
            f"The demo's {config.backend} back-end needs {', '.join(missing)}: {DEMO_EXTRA}",
            name=missing[0],
        )
    rank_zero = _is_rank_zero()
    say = print if (config.verbose and rank_zero) else (lambda *args, **kwargs: None)
    # The demo runs on CPUs: DeepSpeed, when installed, would say so at its import by transformers.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = _use_threads(config.threads)
    why = "" if config.threads else " (the tiny model runs fastest on one; --threads N to change)"
    say(f"torch threads: {threads} per process{why}")
    draw = _can_draw()
    if not draw:  # said before training, not after it
        say(f"matplotlib is not installed: this run writes no {PNG_NAME} ({DEMO_EXTRA}).")
    tokenizer = char_tokenizer()
    train, val = build_data(config)
    model = build_model(config, tokenizer)
    first_rows = BitImageCollator(tokenizer)([val[i] for i in range(4)])
    say(describe_batch(model, first_rows, tokenizer, grid=config.grid))
    if rank_zero:  # the back-ends write this run's records files there
        _remove_old_records(config.records_dir)
    say(
        f"Training {config.max_steps} steps of {config.batch_size} rows ("
        f"{config.micro_batches} micro-batches) on {config.devices} CPU process(es) with "
        f"{config.backend}; validating on {len(val)} rows every {config.val_every} steps"
        f"{_generation_note(config)}.",
        flush=True,
    )
    if config.backend == "lightning":
        from mllm_metrics.demo.lightning_backend import train_lightning

        rows = train_lightning(config, model, tokenizer, train, val)
    else:
        from mllm_metrics.demo.hf_backend import train_hf

        rows = train_hf(config, model, tokenizer, train, val)
    table = format_table(rows)
    csv_path = config.out / CSV_NAME
    png_path = config.out / PNG_NAME if draw else None
    seconds = time.perf_counter() - start
    if rank_zero:
        config.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, csv_path)
        (config.out / TABLE_NAME).write_text(table + "\n")
        if png_path is not None:
            plot_history(
                rows,
                png_path,
                title=f"mllm-metrics demo: {config.bits}-bit images, {config.backend}, "
                f"seed {config.seed}",
            )
        say(f"\n{table}\n")
        final = rows[-1]
        say(
            f"Final: bit-match {final['val/bit_match']:.3f}, exact-match "
            f"{final['val/exact_match']:.3f}{_final_free_running(final)} after "
            f"{int(final['step'])} steps ({seconds:.0f} s)."
        )
        say(f"Wrote {csv_path}, {config.out / TABLE_NAME}")
        say(f"Plot: {png_path}" if png_path else "Plot: none (matplotlib is not installed).")
        say(_records_line(config.records_dir))
    return DemoResult(rows, table, csv_path, png_path, seconds, config, config.records_dir)
