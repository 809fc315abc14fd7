"""What the demo's command line, its runner and its two back-ends share; standard library only.

:class:`DemoConfig` (the options of a run), :class:`DemoResult` (what a run produced),
:data:`METRIC_KEYS` (the columns and curves), and the check of the optional dependencies a run
needs (:func:`missing_dependencies`). Importing this module imports neither torch nor any
framework, so ``mllm-metrics --help`` works with the base install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BACKENDS",
    "CSV_NAME",
    "DEMO_EXTRA",
    "GENERATION_SLACK",
    "METRIC_KEYS",
    "PNG_NAME",
    "RECORDS_NAME",
    "TABLE_NAME",
    "DemoConfig",
    "DemoResult",
    "missing_dependencies",
]

#: The columns of ``metrics.csv`` after ``step``, and the curves of the PNG. The ``gen_*``
#: columns are the free-running (greedy-decoding) twins of the teacher-forced ``bit_match`` and
#: ``exact_match``: nan where nothing was generated (``--backend hf``, or generation off).
METRIC_KEYS: tuple[str, ...] = (
    "val/loss",
    "val/bit_match",
    "val/exact_match",
    "val/text_bit_match",
    "val/text_exact_match",
    "val/gen_bit_match",
    "val/gen_exact_match",
)
#: How many tokens past the answer (``bits`` and ``</s>``) the default generation budget allows.
GENERATION_SLACK = 4
CSV_NAME, PNG_NAME, TABLE_NAME = "metrics.csv", "metrics.png", "table.md"
#: The directory, in ``out``, of the per-sample records of every validation.
RECORDS_NAME = "records"
BACKENDS = ("lightning", "hf")
#: The command that installs everything the demo uses.
DEMO_EXTRA = 'pip install "mllm-metrics[demo]"'
# The modules (import names) each back-end cannot run without; matplotlib only draws the PNG.
_REQUIRED = {
    "lightning": ("lightning", "transformers", "tokenizers"),
    "hf": ("transformers", "accelerate", "tokenizers"),
}


def missing_dependencies(backend: str = "lightning") -> list[str]:
    """The modules a demo run with ``backend`` needs that cannot be imported here.

    ``matplotlib`` is not among them: without it the demo runs and skips ``metrics.png``.

    Args:
        backend: ``"lightning"`` or ``"hf"``.

    Returns:
        Their import names, in a fixed order; empty when everything is installed.

    Examples:
        >>> missing_dependencies("hf")  # with mllm-metrics[demo] installed
        []
    """
    if backend not in _REQUIRED:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    return [name for name in _REQUIRED[backend] if not _importable(name)]


def _importable(name: str) -> bool:
    try:  # a module blocked with ``sys.modules[name] = None`` has no spec either
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # e.g. a module in sys.modules without a __spec__
        return False


@dataclass
class DemoConfig:
    """Everything a demo run depends on; the defaults are the calibrated run of the README.

    Attributes:
        out: directory of ``metrics.csv``, ``metrics.png``, ``table.md`` and ``records/``
            (one JSON Lines file of per-sample records per validation, with each sample's
            group; the records files of an earlier run there are removed when a run starts).
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
        generate_max_new_tokens: with ``--backend lightning``, each validation also decodes
            greedily from every row's prompt (``<s><image> bits:``) for at most this many tokens
            and logs the free-running ``val/gen_bit_match`` and ``val/gen_exact_match`` next to
            the teacher-forced values; the records gain ``gen_exact`` and ``generated``. None
            (default): ``bits + 4``, the answer and its ``</s>`` with room for extra tokens
            (see :attr:`max_new_tokens`); 0: no generation. ``--backend hf`` never generates
            (``transformers.Trainer`` scores teacher-forced logits only): its ``gen_*`` columns
            are nan.
        progress_bar: show one progress bar of the optimizer steps, with the latest
            validation's bit-match and exact-match.
        verbose: print the batch description, the table and the paths.
        threads: torch threads per process. None (default): 1, the fastest for a model this
            small, above all on a machine whose cores other jobs share (more threads only wait
            for each other); the run says what it uses.
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
    generate_max_new_tokens: int | None = None
    progress_bar: bool = True
    verbose: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        positive = ("bits", "max_steps", "val_every", "batch_size", "val_size", "cell_size")
        positive += ("patch_cells", "micro_batches")
        for name in (*positive, "hidden_size", "num_layers", "num_heads", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"`threads` must be None or a positive int, got {self.threads!r}.")
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
        tokens = self.generate_max_new_tokens
        if tokens is not None and (
            not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0
        ):
            raise ValueError(
                "`generate_max_new_tokens` must be None (bits + 4), 0 (no generation) or a "
                f"positive int, got {tokens!r}."
            )
        if self.noise < 0 or self.learning_rate <= 0:
            raise ValueError(
                f"`noise` must be >= 0 and `learning_rate` > 0, got {self.noise} and "
                f"{self.learning_rate}."
            )

    @property
    def max_new_tokens(self) -> int | None:
        """The generation budget the Lightning back-end uses: None when it does not generate.

        Examples:
            >>> DemoConfig().max_new_tokens, DemoConfig(bits=9).max_new_tokens
            (20, 13)
            >>> DemoConfig(generate_max_new_tokens=0).max_new_tokens is None
            True
        """
        if self.generate_max_new_tokens is None:
            return self.bits + GENERATION_SLACK
        return self.generate_max_new_tokens or None

    @property
    def records_dir(self) -> Path:
        """Where the validations' records go: ``out / "records"``."""
        return self.out / RECORDS_NAME

    @property
    def grid(self) -> int:
        """Cells per side of the images (a multiple of ``patch_cells``)."""
        from mllm_metrics.demo.data import grid_side  # imports torch and transformers

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
        png_path: path of ``metrics.png``; None when matplotlib is not installed (no picture).
        seconds: wall time of the whole run.
        config: the run's configuration.
        records_dir: the directory of the per-sample records, one JSON Lines file per
            validation (``val_step0000050.jsonl``, ``eval_...`` with ``--backend hf``); read
            them with ``mllm-metrics report`` or :func:`mllm_metrics.report.load_records`.
    """

    history: list[dict[str, float]]
    table: str
    csv_path: Path
    png_path: Path | None
    seconds: float
    config: DemoConfig = field(repr=False)
    records_dir: Path | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last validation's values."""
        return self.history[-1]
