"""``mllm-metrics demo``: train a tiny LLaVA-style model to read bits from images, and watch.

The whole story in one command: a model whose ``forward`` rewrites its labels (each image
placeholder becomes one feature position per patch of cells), trained on the synthetic task of
:mod:`mllm_metrics.demo.data` and validated with this library's metrics every few steps.
Token bit-match climbs long before whole answers are right: exact-match lags behind it.

Run ``mllm-metrics demo --help`` (or ``python -m mllm_metrics.demo --help``). The results go
to ``--out``: ``metrics.csv`` (one row per validation), ``metrics.png`` (the curves) and
``table.md`` (the final table). ``--devices N`` trains with Lightning's ``ddp`` strategy on N
CPU processes and gives the numbers of the one-process run; ``--backend hf`` trains the same
model on the same data with the stock ``transformers.Trainer`` and
:class:`mllm_metrics.hf.StreamingMetrics`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_metrics.demo.data import (
    BitImageCollator,
    BitImageDataset,
    char_tokenizer,
    grid_side,
)
from mllm_metrics.demo.model import IMAGE_TOKEN_INDEX, TinyLlavaForCausalLM, tiny_llava_config
from mllm_metrics.labels import aligned_forward

__all__ = [
    "METRIC_KEYS",
    "DemoConfig",
    "DemoResult",
    "build_data",
    "build_model",
    "describe_batch",
    "demo_main",
    "format_table",
    "main",
    "plot_history",
    "run_demo",
]

#: The columns of ``metrics.csv`` after ``step``, and the curves of the PNG.
METRIC_KEYS: tuple[str, ...] = (
    "val/loss",
    "val/bit_match",
    "val/exact_match",
    "val/text_bit_match",
    "val/text_exact_match",
)
CSV_NAME, PNG_NAME, TABLE_NAME = "metrics.csv", "metrics.png", "table.md"
BACKENDS = ("lightning", "hf")
# Noise that says nothing about the demo: DataLoader workers on a 2-core CPU, torch internals.
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*`max_epochs` was not set.*",
    # The Lightning module masks the rows DistributedSampler repeats: validation stays exact.
    ".*Using `DistributedSampler` with the dataloaders.*",
)


@dataclass
class DemoConfig:
    """Everything a demo run depends on; the defaults are the calibrated run of the README.

    Attributes:
        out: directory of ``metrics.csv``, ``metrics.png`` and ``table.md``.
        seed: seed of the data, the model's initialisation and the training order.
        bits: bits per image (the answer's length); the grid is the smallest square that
            holds them.
        max_steps: optimizer steps.
        val_every: validate every this many steps (and once before training).
        batch_size: training rows per step, over all processes.
        micro_batches: each step's gradient is the mean of this many micro-batches of
            ``batch_size / micro_batches`` rows (every ``micro_batches``-th row of the step),
            accumulated in one process or spread over ``devices`` processes. One process and
            ``devices == micro_batches`` processes then do the very same float arithmetic: with
            2 processes the weights, and so all the numbers, are bit-for-bit those of one.
        val_size: validation rows.
        noise: standard deviation of the pixel noise.
        learning_rate: peak AdamW learning rate (cosine decay to 0 over ``max_steps``).
        cell_size: pixels per cell side.
        patch_cells: cells per side of the model's patches: each image becomes
            ``(grid / patch_cells) ** 2`` feature positions. With 2, each position holds 4
            bits, and the bits are learned one after the other, which spreads the curves.
        hidden_size: the model's hidden size.
        num_layers: the model's decoder layers.
        num_heads: the model's attention heads.
        devices: CPU processes; more than 1 runs Lightning's ``ddp`` strategy.
        backend: ``"lightning"`` (:class:`~mllm_metrics.lightning.MultimodalLMModule`) or
            ``"hf"`` (``transformers.Trainer`` with :class:`~mllm_metrics.hf.StreamingMetrics`).
        progress_bar: show the framework's progress bar.
        verbose: print the batch description, the table and the paths.
    """

    out: Path = Path("mllm-metrics-demo")
    seed: int = 0
    bits: int = 16
    max_steps: int = 1000
    val_every: int = 50
    batch_size: int = 32
    micro_batches: int = 2
    val_size: int = 256
    noise: float = 0.3
    learning_rate: float = 2e-3
    cell_size: int = 2
    patch_cells: int = 2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    devices: int = 1
    backend: str = "lightning"
    progress_bar: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        positive = ("bits", "max_steps", "val_every", "batch_size", "val_size", "cell_size")
        positive += ("patch_cells", "micro_batches")
        for name in (*positive, "hidden_size", "num_layers", "num_heads", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")
        if self.micro_batches % self.devices or self.batch_size % self.micro_batches:
            raise ValueError(
                f"`micro_batches` ({self.micro_batches}) must be a multiple of `devices` "
                f"({self.devices}) and divide `batch_size` ({self.batch_size}): each process "
                "accumulates micro_batches / devices micro-batches of batch_size / micro_batches "
                "rows per step (pass --micro-batches N for N processes)."
            )
        if self.backend == "hf" and self.devices != 1:
            raise ValueError(
                f"`--backend hf` runs in one process (`devices` = 1), got devices={self.devices}."
            )
        if self.noise < 0 or self.learning_rate <= 0:
            raise ValueError(
                f"`noise` must be >= 0 and `learning_rate` > 0, got {self.noise} and "
                f"{self.learning_rate}."
            )

    @property
    def grid(self) -> int:
        """Cells per side of the images (a multiple of ``patch_cells``)."""
        return grid_side(self.bits, multiple=self.patch_cells)

    @property
    def image_size(self) -> int:
        """Side of the images in pixels."""
        return self.grid * self.cell_size


@dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
        history: one dict per validation: ``step`` and the :data:`METRIC_KEYS`.
        table: the final table (Markdown).
        csv_path: path of ``metrics.csv``.
        png_path: path of ``metrics.png``.
        seconds: wall time of the whole run.
        config: the run's configuration.
    """

    history: list[dict[str, float]]
    table: str
    csv_path: Path
    png_path: Path
    seconds: float
    config: DemoConfig = field(repr=False)

    @property
    def final(self) -> dict[str, float]:
        """The last validation's values."""
        return self.history[-1]


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

    Example:
        >>> row = {"step": 0, "val/loss": 3.51, "val/bit_match": 0.1, "val/exact_match": 0.0}
        >>> print(format_table([row]).replace("val/text_", "text_"))  # (shortened here)
        | step | val/loss | val/bit_match | val/exact_match | text_bit_match | text_exact_match |
        |---:|---:|---:|---:|---:|---:|
        | 0 | 3.510 | 0.100 | 0.000 | nan | nan |
    """
    header = "| step | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|" + "---:|" * (len(METRIC_KEYS) + 1)
    rows = [
        f"| {int(row['step'])} | "
        + " | ".join(f"{row.get(key, math.nan):.3f}" for key in METRIC_KEYS)
        + " |"
        for row in history
    ]
    return "\n".join([header, rule, *rows])


def write_csv(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Write the history to ``path`` with the columns ``step`` and :data:`METRIC_KEYS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", *METRIC_KEYS], extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({"step": int(row["step"]), **{k: row.get(k) for k in METRIC_KEYS}})
    return path


def plot_history(
    history: Sequence[Mapping[str, float]], path: Path | None = None, title: str | None = None
) -> Any:
    """Draw the accuracies and ``val/loss`` against the step; save to ``path`` when given.

    Args:
        history: one dict per validation (``step`` and :data:`METRIC_KEYS`).
        path: where to save the PNG; None only returns the figure.
        title: the figure's title.

    Returns:
        The matplotlib figure.
    """
    # A bare Figure, not pyplot: no backend is chosen or changed, nothing stays open.
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    fig = Figure(figsize=(9, 3.4))
    acc_ax, loss_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    styles = {
        "val/bit_match": ("tab:blue", "-", "o"),
        "val/exact_match": ("tab:red", "-", "o"),
        "val/text_bit_match": ("tab:cyan", "--", "x"),
        "val/text_exact_match": ("tab:orange", "--", "x"),
    }
    for key, (color, line, marker) in styles.items():
        values = [row.get(key, math.nan) for row in history]
        acc_ax.plot(steps, values, line, color=color, marker=marker, markersize=4, label=key)
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title="validation accuracy")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=8)
    loss_ax.plot(steps, [row.get("val/loss", math.nan) for row in history], "o-", color="k")
    loss_ax.set(xlabel="step", ylabel="mean token NLL", title="val/loss", yscale="log")
    loss_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


# ---- the run -----------------------------------------------------------------------------------


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
        The history, the table and the paths of what was written.
    """
    config = dataclasses.replace(config or DemoConfig(), **overrides)
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        return _run(config)


def _run(config: DemoConfig) -> DemoResult:
    start = time.perf_counter()
    rank_zero = _is_rank_zero()
    say = print if (config.verbose and rank_zero) else (lambda *args, **kwargs: None)
    tokenizer = char_tokenizer()
    train, val = build_data(config)
    model = build_model(config, tokenizer)
    first_rows = BitImageCollator(tokenizer)([val[i] for i in range(4)])
    say(describe_batch(model, first_rows, tokenizer, grid=config.grid))
    say(
        f"Training {config.max_steps} steps of {config.batch_size} rows ("
        f"{config.micro_batches} micro-batches) on {config.devices} CPU process(es) with "
        f"{config.backend}; validating on {len(val)} rows every {config.val_every} steps.",
        flush=True,
    )
    if config.backend == "lightning":
        from mllm_metrics.demo.lightning_backend import train_lightning

        rows = train_lightning(config, model, tokenizer, train, val)
    else:
        from mllm_metrics.demo.hf_backend import train_hf

        rows = train_hf(config, model, tokenizer, train, val)
    table = format_table(rows)
    csv_path, png_path = config.out / CSV_NAME, config.out / PNG_NAME
    seconds = time.perf_counter() - start
    if rank_zero:
        config.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, csv_path)
        (config.out / TABLE_NAME).write_text(table + "\n")
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
            f"{final['val/exact_match']:.3f} after {int(final['step'])} steps "
            f"({seconds:.0f} s)."
        )
        say(f"Wrote {csv_path}, {config.out / TABLE_NAME}\nPlot: {png_path}")
    return DemoResult(rows, table, csv_path, png_path, seconds, config)


# ---- command line ------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a tiny LLaVA-style model (its forward rewrites the labels) to read "
        "the bits drawn in small images, validating with mllm-metrics' bit-match and "
        "exact-match; write metrics.csv, table.md and metrics.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = parser.add_argument
    arg("--out", type=Path, default=defaults.out, help="output directory")
    arg("--seed", type=int, default=defaults.seed, help="seed of data, model and order")
    arg("--bits", type=int, default=defaults.bits, help="bits per image (answer length)")
    arg("--max-steps", type=int, default=defaults.max_steps, help="training steps")
    arg("--val-every", type=int, default=defaults.val_every, help="validate every N steps")
    arg("--batch-size", type=int, default=defaults.batch_size, help="rows per step, all devices")
    arg(
        "--micro-batches",
        type=int,
        default=defaults.micro_batches,
        help="micro-batches per step, a multiple of --devices",
    )
    arg("--noise", type=float, default=defaults.noise, help="pixel noise standard deviation")
    arg("--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    arg("--devices", type=int, default=defaults.devices, help="CPU processes (>1: DDP)")
    arg("--backend", choices=BACKENDS, default=defaults.backend, help="training framework")
    arg("--no-progress-bar", action="store_true", help="hide the progress bar")
    return parser


def demo_main(argv: Sequence[str] | None = None, prog: str = "python -m mllm_metrics.demo") -> int:
    """Parse the demo's options and run it (``python -m mllm_metrics.demo``).

    Args:
        argv: the options; None reads ``sys.argv[1:]``.
        prog: the program name shown in ``--help``.

    Returns:
        The exit status (0).
    """
    args = _parser(prog).parse_args(argv)
    try:
        config = DemoConfig(
            out=args.out,
            seed=args.seed,
            bits=args.bits,
            max_steps=args.max_steps,
            val_every=args.val_every,
            batch_size=args.batch_size,
            micro_batches=args.micro_batches,
            noise=args.noise,
            learning_rate=args.lr,
            devices=args.devices,
            backend=args.backend,
            progress_bar=not args.no_progress_bar,
        )
    except ValueError as error:
        _parser(prog).error(str(error))
    run_demo(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mllm-metrics`` console script; its one subcommand is ``demo``.

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: mllm-metrics demo [options]   (mllm-metrics demo --help for the options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] != "demo":
        print(f"mllm-metrics: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return demo_main(argv[1:], prog="mllm-metrics demo")
