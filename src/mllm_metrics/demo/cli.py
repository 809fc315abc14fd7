"""``mllm-metrics demo``: train a tiny LLaVA-style model to read bits from images, and watch.

The whole story in one command: a model whose ``forward`` rewrites its labels (each image
placeholder becomes one feature position per patch of cells), trained on the synthetic task of
:mod:`mllm_metrics.demo.data` and validated with this library's metrics every few steps.
Token bit-match climbs long before whole answers are right: exact-match lags behind it. Each
validation also decodes every answer greedily from its prompt and scores it: the free-running
``val/gen_exact_match`` equals exact-match (one answer per row), ``val/gen_bit_match`` lags
bit-match while the model errs (``--generate-max-new-tokens 0`` turns this off).

Run ``mllm-metrics demo --help`` (or ``python -m mllm_metrics.demo --help``). The results go
to ``--out``: ``metrics.csv`` (one row per validation), ``metrics.png`` (the curves),
``table.md`` (the final table) and ``records/`` (one JSON Lines file of per-sample records per
validation, each sample with its group; ``mllm-metrics report`` reads them). ``--devices N``
trains with Lightning's ``ddp`` strategy on N CPU processes and gives the numbers (and records)
of the one-process run; ``--backend hf`` trains the same model on the same data with the stock
``transformers.Trainer`` and :class:`mllm_metrics.hf.StreamingMetrics`.

This module only parses the command line: it imports the run (:mod:`mllm_metrics.demo.runner`,
which needs the ``[demo]`` extra) once the options are known, so ``--help`` works with the base
install, and a missing dependency is a one-line error that names the extra to install. The
run's names (:func:`run_demo`, :func:`build_model`...) stay importable from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_metrics.demo.config import (
    BACKENDS,
    DEMO_EXTRA,
    GENERATION_SLACK,
    METRIC_KEYS,
    DemoConfig,
    DemoResult,
    missing_dependencies,
)

if TYPE_CHECKING:
    from mllm_metrics.demo.runner import (
        build_data,
        build_model,
        describe_batch,
        format_table,
        plot_history,
        run_demo,
        write_csv,
    )

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
    "write_csv",
]

# The run's names, imported from mllm_metrics.demo.runner on first use (PEP 562).
_RUNNER_NAMES = frozenset(
    {"build_data", "build_model", "describe_batch", "format_table", "plot_history"}
    | {"run_demo", "write_csv"}
)
USAGE = (
    "usage: mllm-metrics demo [options]   (mllm-metrics demo --help for the options)\n"
    "       mllm-metrics report PATH [options]   (mllm-metrics report --help)"
)
HELP = f"""{USAGE}

Streaming, DDP-exact bit-match and exact-match metrics for multimodal LLMs.

commands:
  demo    train a tiny LLaVA-style model to read the bits drawn in small images and
          watch bit-match and exact-match (needs {DEMO_EXTRA})
  report  read the per-sample records an evaluation wrote to PATH: metrics per step and
          group, the worst samples, the exact-match flips, and a plot (needs matplotlib)"""


def __getattr__(name: str) -> Any:
    if name in _RUNNER_NAMES:
        from mllm_metrics.demo import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parser(prog: str) -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a tiny LLaVA-style model (its forward rewrites the labels) to read "
        "the bits drawn in small images, validating with mllm-metrics' bit-match and "
        "exact-match; write metrics.csv, table.md, metrics.png and the per-sample records "
        "(records/, read by mllm-metrics report). Needs the demo extra: "
        f"{DEMO_EXTRA}.",
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
    arg(
        "--generate-max-new-tokens",
        type=_max_new_tokens,
        default="auto",
        metavar="N",
        help="also decode each validation answer greedily (free-running val/gen_bit_match and "
        "val/gen_exact_match) for at most N tokens; auto: --bits + "
        f"{GENERATION_SLACK}, 0: off; lightning back-end only (hf: nan)",
    )
    arg(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per process (default: 1, the fastest for this tiny model, above all "
        "on a machine whose cores other jobs share)",
    )
    arg("--no-progress-bar", action="store_true", help="hide the progress bar")
    return parser


def _max_new_tokens(text: str) -> int | None:
    """``--generate-max-new-tokens``: ``auto`` (None: ``bits + 4``) or an int >= 0."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or an int >= 0 (0: off), got {text!r}")
    return value


def demo_main(argv: Sequence[str] | None = None, prog: str = "python -m mllm_metrics.demo") -> int:
    """Parse the demo's options and run it (``python -m mllm_metrics.demo``).

    Args:
        argv: the options; None reads ``sys.argv[1:]``.
        prog: the program name shown in ``--help`` and in error messages.

    Returns:
        The exit status: 0, or 1 (after one line on stderr) when a dependency of the chosen
        back-end is not installed.
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
            generate_max_new_tokens=args.generate_max_new_tokens,
            progress_bar=not args.no_progress_bar,
            threads=args.threads,
        )
    except ValueError as error:
        _parser(prog).error(str(error))
    missing = missing_dependencies(config.backend)
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[1:] else missing)
        verb = "are" if missing[1:] else "is"
        print(f"{prog} needs {names}, which {verb} not installed: {DEMO_EXTRA}", file=sys.stderr)
        return 1
    from mllm_metrics.demo.runner import run_demo

    run_demo(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mllm-metrics`` console script: the subcommands ``demo`` and ``report``.

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if argv[0] == "report":
        # Standard library only (matplotlib for the PNG): no framework is imported.
        from mllm_metrics.report import report_main

        return report_main(argv[1:], prog="mllm-metrics report")
    if argv[0] != "demo":
        print(f"mllm-metrics: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return demo_main(argv[1:], prog="mllm-metrics demo")
