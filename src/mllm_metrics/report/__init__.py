"""``mllm-metrics report PATH``: read per-sample records back, as tables, worst samples and flips.

An evaluation with ``records_dir`` set writes one JSON Lines file per evaluation, one line per
sample in the order of the eval set::

    {"index": 0, "supervised_tokens": 9, "correct_tokens": 7, "exact": false, "nll": 3.21,
     "group": "few", "prediction": "0101", "reference": "0111"}

named ``{stage}_step{global_step:07d}.jsonl`` (``_dl{N}`` before the suffix with several
dataloaders; ``_call{N}`` instead of ``_step{N}`` when the step is unknown). The aggregates
are recomputed from the sums, as the metrics do (tokens weigh, not samples), so the report
agrees with the logged ``bit_match`` and ``exact_match``, and it adds what a scalar cannot say:
which samples are wrong and worst, and which changed their mind between the last two
evaluations.

Two evaluations are compared sample by sample only when they hold the same samples (the same
eval set) and come from the same run (:mod:`mllm_metrics.report.series`); a folder where two
runs wrote is reported as such. A records file that cannot be read is named with the reason,
and the others are reported (:func:`~mllm_metrics.report.records.scan_records`).
``--html FILE`` also writes the report as one self-contained web page
(:mod:`mllm_metrics.report.html`).

Only the standard library is imported here; :func:`plot_report` imports matplotlib when called.
"""

from mllm_metrics.report.cli import report_main
from mllm_metrics.report.markdown import format_report, worst_samples
from mllm_metrics.report.metrics import Metrics, Summary, summarize
from mllm_metrics.report.plot import curve_sets, plot_report
from mllm_metrics.report.records import (
    RecordsFile,
    RecordsScan,
    UnreadFile,
    load_records,
    scan_records,
)
from mllm_metrics.report.series import group_series

__all__ = [
    "Metrics",
    "RecordsFile",
    "RecordsScan",
    "Summary",
    "UnreadFile",
    "curve_sets",
    "format_report",
    "group_series",
    "load_records",
    "plot_report",
    "report_main",
    "scan_records",
    "summarize",
    "worst_samples",
]
