"""Per-sample tables in experiment trackers: TensorBoard, Weights & Biases, MLflow, CSV.

At the end of every evaluation that writes records (``records_dir``; not the sanity check),
process 0 turns the records it has just gathered into one table: ``{stage}/samples`` for
Lightning (``val/samples``, ``/dataloader_idx_N`` with several dataloaders),
``{metric_key_prefix}/samples`` for ``transformers.Trainer`` (``eval/samples``). Its rows:

- the worst samples: those with a wrong supervised token, lowest share of correct tokens
  first, then highest NLL (:func:`~mllm_metrics.report.worst_samples`), at most
  :data:`TABLE_ROWS`;
- the samples whose exact match flipped since the previous evaluation of the same table, right
  to wrong, then wrong to right, at most :data:`TABLE_ROWS` of each, when the two evaluations
  are comparable: the same eval set and one run, a later step
  (:func:`~mllm_metrics.report.series.default_flips`).

The rules are the report's own (:mod:`mllm_metrics.report`), applied to the records in memory
(:attr:`~mllm_metrics.evaluation.Evaluation.last_records`): nothing is synced or read from
disk, and the previous evaluation's records are kept on process 0 only, one evaluation per
table. ``sample_tables(module).rows = N`` lists more or fewer samples.

Each tracker gets the table in its own type, at the global step of the evaluation (the step
of the records file):

- TensorBoard: Markdown text (``add_text``; the Text tab renders it, as ``mllm-metrics report``
  prints the worst samples and the flips), tag ``{key}/text_summary``;
- W&B: a ``wandb.Table`` logged under ``{key}``;
- MLflow: a table artifact ``{key}_step{N:07d}.json`` (``log_table``) in the run;
- Lightning's CSVLogger: ``{log_dir}/{key}_step{N:07d}.csv``.

Lightning: :class:`~mllm_metrics.lightning.MultimodalLMModule` logs the table to each of
``trainer.loggers`` of those kinds, on global rank 0, after writing the records (during
``fit``, Lightning logs every validation's values at ``global_step - 1``: it raises its logging
step only after the validation, so the curves' point sits one step before the table's).
``transformers.Trainer``:
:class:`~mllm_metrics.hf.StreamingMetrics` finds the reporting callbacks ``report_to`` added
(``TensorBoardCallback``, ``WandbCallback``, ``MLflowCallback``) and, on process 0, adds a small
callback of its own to the trainer that logs the table right after ``Trainer`` has logged the
evaluation's values (``on_evaluate``/``on_predict``, when each of them has started its run).

The per-group values reach every tracker as scalars already (``val/bit_match/<group>``;
``eval_bit_match/<group>``, which TensorBoard and W&B show as ``eval/bit_match/<group>``).
MLflow's file store (``file:./mlruns``) cannot hold them: a metric's name is a file path there,
and ``val/bit_match`` is a file where ``val/bit_match/<group>`` needs a folder; use a database
store (``sqlite:///mlflow.db``) or a tracking server.

No tracker library is imported here, nor by ``mllm_metrics``, ``mllm_metrics.lightning`` or
``mllm_metrics.hf``: the trackers are found from the objects the user created, so each stays
an optional extra (``pip install "mllm-metrics[trackers]"``).
"""

from __future__ import annotations

import csv
import functools
import importlib
import math
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_metrics.records import free_path, records_file_name
from mllm_metrics.report.markdown import flips_section, worst_samples, worst_section
from mllm_metrics.report.metrics import nll_value, share
from mllm_metrics.report.records import RecordsFile
from mllm_metrics.report.series import default_flips, group_series

__all__ = ["TABLE_ROWS", "TRACKERS_EXTRA", "SampleTables", "SamplesTable", "sample_tables"]

#: How many samples each list of a table holds at most (the worst; each kind of flip).
TABLE_ROWS = 10
#: What to install for the trackers.
TRACKERS_EXTRA = 'pip install "mllm-metrics[trackers]"'

# The names of the lists in the ``list`` column, as the report words them.
WORST, LOST, GAINED = "worst", "right -> wrong", "wrong -> right"
_TEXTS = ("prediction", "reference", "gen_exact", "generated")


@dataclass
class SamplesTable:
    """One evaluation's table of samples, ready for any tracker.

    Attributes:
        key: ``val/samples``, ``val/samples/dataloader_idx_1``, ``eval/samples``...
        step: the global step of the evaluation.
        columns: ``list``, ``index``, [``group``], ``correct_tokens``, ``supervised_tokens``,
            ``share``, ``nll``, ``exact``, then those of ``prediction``, ``reference``,
            ``gen_exact``, ``generated`` that the records hold.
        rows: the worst samples, then the flips right to wrong, then wrong to right; one list
            of plain values per row (None where a record has none).
        text: the same, as the report writes it (Markdown: a heading and a pipe table per
            list), with the report's notes when the flips could not be compared.
    """

    key: str
    step: int
    columns: list[str]
    rows: list[list[Any]]
    text: str

    def as_columns(self) -> dict[str, list[Any]]:
        """The table column by column."""
        return {name: [row[i] for row in self.rows] for i, name in enumerate(self.columns)}


class SampleTables:
    """Builds each evaluation's :class:`SamplesTable` and keeps, per table key, the previous
    evaluation's records to find the flips (on process 0, where the records are gathered).

    Args:
        rows: how many samples each list holds at most.

    Examples:
        >>> def records(exact):
        ...     return [{"index": i, "supervised_tokens": 2, "correct_tokens": 2 if e else 1,
        ...              "exact": e, "nll": 0.5 * i} for i, e in enumerate(exact)]
        >>> tables = SampleTables()
        >>> first = tables.build("val/samples", records([True, False, False]), stage="val",
        ...                      step=10)
        >>> [row[:2] for row in first.rows]  # 1/2 right twice: the higher NLL first
        [['worst', 2], ['worst', 1]]
        >>> second = tables.build("val/samples", records([False, True, False]), stage="val",
        ...                       step=20)
        >>> [row[:2] for row in second.rows]
        [['worst', 2], ['worst', 0], ['right -> wrong', 0], ['wrong -> right', 1]]
    """

    def __init__(self, rows: int = TABLE_ROWS) -> None:
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError(f"`rows` must be an int >= 0, got {rows!r}.")
        self.rows = rows
        self._previous: dict[str, RecordsFile] = {}

    def build(
        self,
        key: str,
        records: Sequence[Mapping[str, Any]],
        *,
        stage: str,
        step: int,
        dataloader: int | None = None,
        path: Path | None = None,
    ) -> SamplesTable:
        """The table of one evaluation; it becomes the previous one of ``key``.

        Args:
            key: the table's name in the trackers.
            records: the evaluation's records, in order (what ``write_records`` gathered).
            stage: the records file's stage (``val``, ``eval``...).
            step: the global step of the evaluation.
            dataloader: the dataloader, when the stage has several.
            path: the records file written, for the report's notes (default: its usual name).
        """
        name = Path(records_file_name(stage, step, dataloader)) if path is None else Path(path)
        file = RecordsFile(
            stage=stage,
            step=step,
            kind="step",
            dataloader=dataloader,
            path=name,
            records=list(records),
            mtime=time.time(),  # the report tells runs apart by the order of the evaluations
        )
        previous = self._previous.get(key)
        self._previous[key] = file
        (series,) = group_series([f for f in (previous, file) if f is not None])
        eval_set = next(s for s in series.eval_sets if any(f is file for f in s.files))
        choice = default_flips(eval_set)
        listed = [(WORST, record) for record in worst_samples(file.records)[: self.rows]]
        if choice.flips is not None:
            listed += [(LOST, record) for record in choice.flips.lost[: self.rows]]
            listed += [(GAINED, record) for record in choice.flips.gained[: self.rows]]
        columns = _columns(file.records)
        rows = [[_value(name, kind, record) for name in columns] for kind, record in listed]
        lines = [f"Warning: {note}" for note in series.notes]
        lines += [*worst_section(file, self.rows), "", *flips_section(eval_set, self.rows, choice)]
        return SamplesTable(key, step, columns, rows, "\n\n".join(_paragraphs(lines)))


def _columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    fields = set().union(*(record.keys() for record in records)) if records else set()
    columns = ["list", "index", *(["group"] if "group" in fields else [])]
    columns += ["correct_tokens", "supervised_tokens", "share", "nll", "exact"]
    return columns + [name for name in _TEXTS if name in fields]


def _value(name: str, kind: str, record: Mapping[str, Any]) -> Any:
    if name == "list":
        return kind
    if name == "share":
        return share(record)
    if name == "nll":
        nll = nll_value(record)
        return None if math.isnan(nll) else nll
    value = record.get(name)
    return str(value) if name == "group" and value is not None else value


def _paragraphs(lines: list[str]) -> list[str]:
    """The report's lines as Markdown blocks (a table's lines stay together)."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return ["\n".join(block) for block in blocks if block]


# ---- the trackers -------------------------------------------------------------------------------

_OWNERS: weakref.WeakKeyDictionary[Any, SampleTables] = weakref.WeakKeyDictionary()


def sample_tables(owner: Any) -> SampleTables:
    """The :class:`SampleTables` of a ``MultimodalLMModule`` or ``StreamingMetrics``; set
    ``sample_tables(module).rows`` to list more or fewer samples."""
    tables = _OWNERS.get(owner)
    if tables is None:
        tables = _OWNERS[owner] = SampleTables()
    return tables


def _require(module: str, what: str) -> Any:
    """Import ``module`` or raise the one-line hint of the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as missing:
        if missing.name is not None and missing.name.partition(".")[0] != module:
            raise
        raise ModuleNotFoundError(
            f"{what} needs {module}, which is not installed: {TRACKERS_EXTRA}", name=module
        ) from None


def _frame(table: SamplesTable) -> Any:
    """The table as a pandas DataFrame of Python objects (ints stay ints, None stays null)."""
    pandas = _require("pandas", "The samples table for MLflow")
    return pandas.DataFrame(table.as_columns(), columns=table.columns, dtype=object)


def _log_text(writer: Any, key: str, table: SamplesTable) -> None:
    writer.add_text(key, table.text, global_step=table.step)
    writer.flush()  # readable now, not at the writer's next periodic flush


def _file_name(key: str, step: int, suffix: str) -> str:
    """``{key}_step{step:07d}{suffix}``: the file of a tracker that keeps one table per file."""
    return f"{key}_step{step:07d}{suffix}"


def _log_mlflow(client: Any, run_id: str, key: str, table: SamplesTable) -> None:
    client.log_table(run_id, data=_frame(table), artifact_file=_file_name(key, table.step, ".json"))


def _write_csv(directory: str | Path, key: str, table: SamplesTable) -> None:
    path = free_path(Path(directory) / _file_name(key, table.step, ".csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(table.columns)
        writer.writerows(table.rows)


# ---- Lightning ----------------------------------------------------------------------------------


def _prefixed(logger: Any, key: str) -> str:
    """``key`` with the logger's ``prefix``, as it prefixes the scalars."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}{key}" if prefix else key


def log_lightning_tables(
    module: Any,
    stage: str,
    dataloader_idx: int | None,
    records: Sequence[Mapping[str, Any]],
    path: Path | None = None,
) -> None:
    """Log one evaluation's table to each of the trainer's loggers that has a table type.

    Called by :class:`~mllm_metrics.lightning.MultimodalLMModule` at the end of a
    validation/test epoch, on global rank 0, after the records are written; the step is
    ``trainer.global_step``. ``TensorBoardLogger``: ``add_text``; ``WandbLogger``:
    ``log_table``; ``MLFlowLogger``: ``log_table`` into its run; ``CSVLogger``: a CSV file in
    its ``log_dir``. Other loggers get nothing.
    """
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    kinds = (TensorBoardLogger, WandbLogger, MLFlowLogger, CSVLogger)
    loggers = [logger for logger in module.trainer.loggers if isinstance(logger, kinds)]
    if not loggers:
        return
    key = f"{stage}/samples" + (
        "" if dataloader_idx is None else f"/dataloader_idx_{dataloader_idx}"
    )
    table = sample_tables(module).build(
        key,
        records,
        stage=stage,
        step=module.trainer.global_step,
        dataloader=dataloader_idx,
        path=path,
    )
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _log_text(logger.experiment, _prefixed(logger, key), table)
        elif isinstance(logger, WandbLogger):  # prefixes the key itself
            logger.log_table(key, columns=table.columns, data=table.rows, step=table.step)
        elif isinstance(logger, MLFlowLogger):
            _log_mlflow(logger.experiment, logger.run_id, _prefixed(logger, key), table)
        else:
            _write_csv(logger.log_dir, _prefixed(logger, key), table)


# ---- transformers.Trainer -----------------------------------------------------------------------


def _trainer_in_stack() -> Any:
    """The ``Trainer`` whose evaluation loop is running this call, or None."""
    from mllm_metrics.hf.metrics import evaluation_loop_frame

    frame = evaluation_loop_frame()
    trainer = None if frame is None else frame.f_locals["self"]
    return trainer if hasattr(trainer, "callback_handler") else None


_CALLBACKS = {
    "TensorBoardCallback": "tensorboard",
    "WandbCallback": "wandb",
    "MLflowCallback": "mlflow",
}


def _tracker_callbacks(trainer: Any) -> list[tuple[str, Any]]:
    """The trainer's TensorBoard, W&B and MLflow callbacks (what ``report_to`` added), each
    with its tracker's name."""
    integrations = sys.modules.get("transformers.integrations.integration_utils")
    kinds = [(getattr(integrations, name, None), tracker) for name, tracker in _CALLBACKS.items()]
    found = []
    for callback in trainer.callback_handler.callbacks:
        tracker = next(
            (t for kind, t in kinds if isinstance(kind, type) and isinstance(callback, kind)), None
        )
        if tracker is not None:
            found.append((tracker, callback))
    return found


def log_trainer_tables(
    owner: Any, prefix: str, records: Sequence[Mapping[str, Any]], path: Path | None = None
) -> None:
    """Queue one evaluation's table for the ``Trainer`` that runs it, if it reports anywhere.

    Called by :class:`~mllm_metrics.hf.StreamingMetrics` at the end of an evaluation, on
    process 0, after the records are written. The table is logged right after ``Trainer``
    has logged the evaluation's values (its ``on_evaluate``/``on_predict`` event, when every
    reporting callback has started its run), at ``state.global_step``: TensorBoard's
    ``tb_writer.add_text``, W&B's ``wandb.Table`` in the active run, MLflow's ``log_table`` in
    the active run. Outside a ``Trainer``, or with no such callback, nothing is logged.
    """
    trainer = _trainer_in_stack()
    if trainer is None or not _tracker_callbacks(trainer):
        return
    key = f"{prefix}/samples"
    table = sample_tables(owner).build(
        key, records, stage=prefix, step=trainer.state.global_step, path=path
    )
    _tables_callback(trainer).pending[key] = table  # the latest of each key


def _tables_callback(trainer: Any) -> Any:
    kind = _callback_class()
    found = next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)
    if found is None:
        found = kind(trainer)
        trainer.add_callback(found)
    return found


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class SampleTablesCallback(TrainerCallback):
        """Logs the queued tables once ``Trainer`` has logged the evaluation's values."""

        def __init__(self, trainer: Any) -> None:
            self._trainer = weakref.ref(trainer)
            self.pending: dict[str, SamplesTable] = {}

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._log()

        def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._log()

        def _log(self) -> None:
            pending, self.pending = self.pending, {}
            trainer = self._trainer()
            if trainer is None:
                return
            for table in pending.values():
                _log_to_callbacks(_tracker_callbacks(trainer), table)

    return SampleTablesCallback


def _log_to_callbacks(callbacks: list[tuple[str, Any]], table: SamplesTable) -> None:
    """Log ``table`` through each callback whose tracker has started (on process 0)."""
    for tracker, callback in callbacks:
        if tracker == "tensorboard":
            if getattr(callback, "tb_writer", None) is not None:
                _log_text(callback.tb_writer, table.key, table)
        elif tracker == "wandb":
            wandb = getattr(callback, "_wandb", None)
            if wandb is not None and wandb.run is not None:
                data = wandb.Table(columns=table.columns, data=table.rows)
                wandb.run.log({table.key: data, "train/global_step": table.step})
        else:
            mlflow = getattr(callback, "_ml_flow", None)
            run = None if mlflow is None else mlflow.active_run()
            if run is not None:
                _log_mlflow(mlflow.MlflowClient(), run.info.run_id, table.key, table)
