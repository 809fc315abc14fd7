"""The ``mllm-metrics`` command: ``demo``, ``report`` and ``--version``.

Each subcommand is imported once it is chosen, so ``mllm-metrics --help``, ``--version``,
``demo --help`` and ``report`` work with the base install (torch and torchmetrics): the demo's
frameworks (Lightning, transformers) are imported only to run it, and the report needs the
standard library (matplotlib for its PNG).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["HELP", "USAGE", "main", "version"]

USAGE = (
    "usage: mllm-metrics demo [options]   (mllm-metrics demo --help for the options)\n"
    "       mllm-metrics report PATH [options]   (mllm-metrics report --help)\n"
    "       mllm-metrics --version"
)
HELP = f"""{USAGE}

Streaming, DDP-exact bit-match and exact-match metrics for multimodal LLMs.

commands:
  demo       train a tiny LLaVA-style model to read the bits drawn in small images and
             watch bit-match and exact-match (needs pip install "mllm-metrics[demo]")
  report     read the per-sample records an evaluation wrote to PATH: metrics per step and
             group, the samples with an error, the exact-match flips, a plot (needs
             matplotlib) and, with --html FILE, one self-contained web page

options:
  -h, --help     show this help and exit
  --version      show the installed version and exit"""


def version() -> str:
    """The installed version of mllm-metrics.

    From the installed package's metadata; ``mllm_metrics.__version__`` when it is not
    installed (e.g. run from a source tree on ``PYTHONPATH``).

    Examples:
        >>> import mllm_metrics
        >>> version() == mllm_metrics.__version__  # an install of this source tree
        True
    """
    from importlib import metadata

    try:
        return metadata.version("mllm-metrics")
    except metadata.PackageNotFoundError:
        import mllm_metrics

        return mllm_metrics.__version__


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mllm-metrics`` console script.

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: the subcommand's; 0 for ``--help`` and ``--version``; 2 (with the
        usage on stderr) without a command or with an unknown one.

    Examples:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        mllm-metrics ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(HELP)
        return 0
    if command == "--version":
        print(f"mllm-metrics {version()}")
        return 0
    if command == "report":
        from mllm_metrics.report import report_main

        return report_main(rest, prog="mllm-metrics report")
    if command == "demo":
        # Parses the options with the standard library; imports the run's frameworks to run.
        from mllm_metrics.demo.cli import demo_main

        return demo_main(rest, prog="mllm-metrics demo")
    print(f"mllm-metrics: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
