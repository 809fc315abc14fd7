"""Experiment trackers, real ones, offline: what each tracker's own reader finds.

Through Lightning's loggers (``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``,
``CSVLogger``) and ``Trainer``'s ``report_to`` (``tensorboard``, ``wandb``, ``mlflow``), two
evaluations of a model whose output head changes in between (so samples flip both ways); then
the files are read back with each tracker's reader: TensorBoard's ``EventAccumulator``, MLflow's
``MlflowClient`` on a local SQLite store, W&B's offline run directory (its ``.wandb``
transaction log, read with W&B's own protobuf schema, and the table files it points to).

Every expected value is computed here from the records files the evaluations wrote: the per-group
curves from the sums, the worst samples by sorting on the share of correct tokens then the NLL,
the flips by comparing ``exact`` index by index. Nothing is read back from the code under test.

Each tracker's tests skip when its package is missing, except under ``CI=true``, which installs
them (``pip install -e ".[dev]"``): there they fail. Nothing reaches the network: W&B runs with
``mode="offline"``, MLflow and TensorBoard write under ``tmp_path``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from _reference import grouped_batches

from mllm_metrics.trackers import TRACKERS_EXTRA, SampleTables

ROWS = 10  # the default number of samples per list
# MLflow's SQLite store uses a loader strategy SQLAlchemy 2.1 deprecates (MLflow's, not ours).
MLFLOW_SQLITE = pytest.mark.filterwarnings("ignore:.*noload.*loader strategy")
LISTS = ("worst", "right -> wrong", "wrong -> right")


def _tracker(package: str):
    """Import a tracker's package; skip without it, except under CI=true (which installs it)."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, where the tracker tests must run, but {missing}")
        pytest.skip(f"{package} is not installed ({TRACKERS_EXTRA})")


def _mlflow():
    """MLflow, and what its local SQLite store needs."""
    for package in ("sqlalchemy", "alembic"):
        _tracker(package)
    return _tracker("mlflow")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Every tracker writes under tmp_path (also the current directory) and nowhere else; W&B
    offline and quiet; MLflow in a SQLite file (its file store cannot hold ``val/bit_match``
    next to ``val/bit_match/<group>``: the first is a file, the second needs it as a folder)."""
    monkeypatch.chdir(tmp_path)  # the default places: ./mlruns, ./runs, ./wandb
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_PROJECT": "mllm-metrics-tests",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tensorboard"),
    }.items():
        monkeypatch.setenv(name, value)
    yield tmp_path
    wandb, mlflow = sys.modules.get("wandb"), sys.modules.get("mlflow")
    if wandb is not None:  # its settings are read once per process, at the first run
        wandb.teardown()
    if mlflow is not None:  # MLFlowLogger sets the process's tracking URI
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


# ---- what the tables must hold, from the records files ------------------------------------------


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _share(record: dict) -> float:
    return record["correct_tokens"] / record["supervised_tokens"]


def expected_lists(before: list[dict] | None, after: list[dict], rows: int = ROWS):
    """``[(list, record), ...]``: the worst samples of ``after``, then its flips since
    ``before``."""
    wrong = [r for r in after if r["correct_tokens"] < r["supervised_tokens"]]
    wrong.sort(key=lambda r: (_share(r), -r["nll"], r["index"]))  # worst share, then NLL
    listed = [("worst", r) for r in wrong[:rows]]
    if before is not None:
        # One eval set: the same indexes, each with the same supervised tokens, reference, group.
        def sample(r):
            return (r["index"], r["supervised_tokens"], r.get("reference"), r.get("group"))

        assert [sample(r) for r in before] == [sample(r) for r in after]
        was = {r["index"]: r["exact"] for r in before}
        lost = [r for r in after if was[r["index"]] is True and r["exact"] is False]
        gained = [r for r in after if was[r["index"]] is False and r["exact"] is True]
        listed += [("right -> wrong", r) for r in lost[:rows]]
        listed += [("wrong -> right", r) for r in gained[:rows]]
    return listed


COLUMNS = [
    "list",
    "index",
    "group",
    "correct_tokens",
    "supervised_tokens",
    "share",
    "nll",
    "exact",
    "prediction",
    "reference",
]


def expected_table(before, after, rows: int = ROWS) -> list[dict]:
    """The table's rows, column by column."""
    return [
        {
            "list": kind,
            "index": r["index"],
            "group": r["group"],
            "correct_tokens": r["correct_tokens"],
            "supervised_tokens": r["supervised_tokens"],
            "share": _share(r),
            "nll": r["nll"],
            "exact": r["exact"],
            "prediction": r["prediction"],
            "reference": r["reference"],
        }
        for kind, r in expected_lists(before, after, rows)
    ]


def expected_markdown(before, after, rows: int = ROWS) -> dict[str, list[list[str]]]:
    """The cells of the Markdown tables, per list, as the report prints them."""
    tables: dict[str, list[list[str]]] = {}
    for kind, r in expected_lists(before, after, rows):
        c, s = r["correct_tokens"], r["supervised_tokens"]
        cells = [str(r["index"]), r["group"], f"{c}/{s}"]
        if kind == "worst":
            cells += [f"{c / s:.3f}", f"{r['nll']:.3f}"]
        tables.setdefault(kind, []).append([*cells, r["prediction"], r["reference"]])
    return tables


def parse_markdown(text: str) -> dict[str, list[list[str]]]:
    """The pipe tables of a table's text, by the list named in the block before each."""
    blocks = text.split("\n\n")
    tables: dict[str, list[list[str]]] = {}
    for before, block in zip(blocks, blocks[1:]):
        if not block.startswith("| index |"):
            continue
        kind = next((k for k in LISTS if before.startswith(k)), None)
        kind = "worst" if before.startswith("Worst") else kind
        assert kind is not None and kind not in tables, before
        lines = block.splitlines()
        tables[kind] = [
            [cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]
        ]
    return tables


def expected_curves(records: list[dict], nll: str) -> dict[str, float]:
    """``bit_match/<group>``, ``exact_match/<group>`` and ``<nll>/<group>`` from the sums."""
    values = {}
    for group in sorted({r["group"] for r in records}):
        part = [r for r in records if r["group"] == group]
        supervised = sum(r["supervised_tokens"] for r in part)
        exact = [r["exact"] for r in part if r["exact"] is not None]
        values[f"bit_match/{group}"] = sum(r["correct_tokens"] for r in part) / supervised
        values[f"exact_match/{group}"] = sum(exact) / len(exact)
        values[f"{nll}/{group}"] = sum(r["nll"] for r in part) / supervised
    return values


def assert_rows(got: list[dict], expected: list[dict], rel: float = 1e-12) -> None:
    assert [(row["list"], row["index"]) for row in got] == [
        (row["list"], row["index"]) for row in expected
    ]
    for row, want in zip(got, expected, strict=True):
        assert row.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert row[name] == pytest.approx(value, rel=rel), name
            else:
                assert row[name] == value, name


def assert_flips_both_ways(before, after) -> None:
    kinds = {kind for kind, _ in expected_lists(before, after)}
    assert kinds == set(LISTS), "the test's evaluations must flip samples both ways"


# ---- the trackers' readers ----------------------------------------------------------------------


def read_tensorboard(logdir: Path) -> tuple[dict, dict]:
    """``({tag: {step: value}}, {tag: {step: text}})`` with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in tags["scalars"]
    }
    texts = {
        tag: {
            event.step: b"".join(event.tensor_proto.string_val).decode()
            for event in accumulator.Tensors(tag)
        }
        for tag in tags["tensors"]
    }
    return scalars, texts


def tensorboard_html(text: str) -> str:
    """What TensorBoard's Text tab serves for a text summary: its sanitized Markdown as HTML."""
    import numpy as np

    with warnings.catch_warnings():  # TensorBoard's vendored sanitizer warns of itself
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.plugins.text.text_plugin import text_array_to_html

        return text_array_to_html(np.array(text), enable_markdown=True)


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``): LevelDB-style log blocks of
    32 KiB after a 7-byte header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, payload = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # the rest of a block too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zeros: padding to the end of the block
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def read_wandb(root: Path, step_key: str) -> tuple[dict, dict]:
    """``({key: {step: value}}, {key: {step: rows}})`` of the one offline run under ``root``."""
    (run_dir,) = root.glob("wandb/offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    scalars: dict = {}
    tables: dict = {}
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        step = items[step_key]
        for key, value in items.items():
            if key.endswith("/_type") and value == "table-file":
                name = key[: -len("/_type")]
                table = json.loads((run_dir / "files" / items[f"{name}/path"]).read_text())
                rows = [dict(zip(table["columns"], row)) for row in table["data"]]
                tables.setdefault(name, {})[step] = rows
            elif isinstance(value, (int, float)) and not key.startswith("_"):
                scalars.setdefault(key, {})[step] = value
    return scalars, tables


def read_mlflow(tracking_uri: str, run_id: str, keys: list[str]) -> tuple[dict, dict]:
    """``({key: {step: value}}, {artifact: rows})`` from a local MLflow store (the values
    from its database, the tables from its artifact folder)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    scalars = {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys
    }
    run = client.get_run(run_id)
    root = Path(unquote(urlparse(run.info.artifact_uri).path))
    # log_table registers each table in this tag: what the MLflow UI shows as tables.
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    tables = {}
    for entry in logged:
        assert entry["type"] == "table"
        table = json.loads((root / entry["path"]).read_text())
        tables[entry["path"]] = [dict(zip(table["columns"], row)) for row in table["data"]]
    return scalars, tables


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def as_csv(rows: list[dict]) -> list[dict]:
    """What a CSV file holds of rows: text (None as empty)."""
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]


# ---- Lightning ----------------------------------------------------------------------------------

GROUPS = ("vqa", "ocr")


class _SpellTokenizer:
    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(token) for token in sequence) for sequence in sequences]


def _batches(count=3, seed=0):
    """Pre-collated batches of 3 rows, answers of 5s and 9s, groups alternating."""
    return grouped_batches(GROUPS, seed, count)


def _fit(tmp_path, loggers, val_loaders=1, rows=None):
    """Two validations (steps 2 and 4) of a model whose head favours 5, then also 9 after the
    first: samples flip both ways. The weights do not train (learning rate 0)."""
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")  # the tiny model
    from _reference import favour_token
    from torch.utils.data import DataLoader

    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
    from mllm_metrics.lightning import MultimodalLMModule
    from mllm_metrics.trackers import sample_tables

    class FavourNine(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    module.model.get_output_embeddings().bias[9] = 0.6

    torch.manual_seed(0)
    model = favour_token(TinyLlavaForCausalLM(tiny_llava_config()))
    module = MultimodalLMModule(
        model,
        tokenizer=_SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        records_dir=tmp_path / "records",
        learning_rate=0.0,
    )
    if rows is not None:
        sample_tables(module).rows = rows
    batches = _batches()
    loaders = [DataLoader(batches, batch_size=None), DataLoader(batches[1:], batch_size=None)]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=loggers,
        callbacks=[FavourNine()],
        num_sanity_val_steps=1,  # the sanity check writes no records and logs no table
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    train = DataLoader(batches[:2], batch_size=None)  # 2 steps per epoch
    val = loaders[0] if val_loaders == 1 else loaders[:val_loaders]
    trainer.fit(module, train, val)
    return tmp_path / "records"


def _lightning_records(records_dir: Path, suffix: str = ""):
    before = _read(records_dir / f"val_step0000002{suffix}.jsonl")
    after = _read(records_dir / f"val_step0000004{suffix}.jsonl")
    assert_flips_both_ways(before, after)
    return before, after


def _assert_lightning_curves(scalars: dict, before, after, prefix="val/") -> None:
    """Each group's series holds the two validations' values, in order. (During ``fit``
    Lightning logs them at the step of the batch that ran the validation, here global steps 1
    and 3; the records files and the tables are at the global step after it, 2 and 4.)"""
    expected_before, expected_after = (expected_curves(r, "loss") for r in (before, after))
    for key in expected_after:
        series = scalars[prefix + key]
        assert sorted(series) == [1, 3], key
        assert [series[1], series[3]] == pytest.approx(
            [expected_before[key], expected_after[key]], rel=1e-6
        ), key


def test_lightning_tensorboard(offline):
    _tracker("tensorboard")
    TensorBoardLogger = pytest.importorskip("lightning.pytorch.loggers").TensorBoardLogger

    logger = TensorBoardLogger(offline / "tb", name="run")
    before, after = _lightning_records(_fit(offline, logger))
    scalars, texts = read_tensorboard(Path(logger.log_dir))
    _assert_lightning_curves(scalars, before, after)
    text = texts["val/samples/text_summary"]  # add_text's tag
    assert sorted(text) == [2, 4]
    assert parse_markdown(text[2]) == expected_markdown(None, before)
    assert parse_markdown(text[4]) == expected_markdown(before, after)
    assert "no flips to compare" in text[2]
    html = tensorboard_html(text[4])  # the Text tab shows the worst samples and the flips
    assert html.count("<table>") == 3 and html.count("<tr>") == 3 + len(
        expected_lists(before, after)
    )


def test_lightning_wandb(offline):
    wandb = _tracker("wandb")
    WandbLogger = pytest.importorskip("lightning.pytorch.loggers").WandbLogger

    logger = WandbLogger(save_dir=offline, offline=True, project="mllm-metrics-tests")
    try:
        records = _fit(offline, logger)
    finally:
        wandb.finish()
        wandb.teardown()  # the service exits: its files are complete
    before, after = _lightning_records(records)
    scalars, tables = read_wandb(offline, "trainer/global_step")
    _assert_lightning_curves(scalars, before, after)
    assert sorted(tables["val/samples"]) == [2, 4]
    assert_rows(tables["val/samples"][2], expected_table(None, before))
    assert_rows(tables["val/samples"][4], expected_table(before, after))


@MLFLOW_SQLITE
def test_lightning_mlflow(offline):
    _mlflow()
    MLFlowLogger = pytest.importorskip("lightning.pytorch.loggers").MLFlowLogger

    uri = os.environ["MLFLOW_TRACKING_URI"]
    logger = MLFlowLogger(experiment_name="tables", tracking_uri=uri)
    before, after = _lightning_records(_fit(offline, logger))
    keys = [f"val/{key}" for key in expected_curves(after, "loss")]
    scalars, tables = read_mlflow(uri, logger.run_id, keys)
    _assert_lightning_curves(scalars, before, after)
    assert sorted(tables) == ["val/samples_step0000002.json", "val/samples_step0000004.json"]
    # pandas writes floats with 10 significant digits
    assert_rows(tables["val/samples_step0000002.json"], expected_table(None, before), 1e-9)
    assert_rows(tables["val/samples_step0000004.json"], expected_table(before, after), 1e-9)


def test_lightning_csv_with_two_dataloaders_and_three_rows(offline):
    CSVLogger = pytest.importorskip("lightning.pytorch.loggers").CSVLogger

    logger = CSVLogger(offline / "csv", name="run")
    records = _fit(offline, logger, val_loaders=2, rows=3)
    log_dir = Path(logger.log_dir)
    metrics = read_csv(log_dir / "metrics.csv")
    for dataloader in (0, 1):
        before, after = _lightning_records(records, f"_dl{dataloader}")
        if dataloader == 0:  # 3 rows leave samples out
            assert len(expected_lists(before, after, rows=3)) < len(expected_lists(before, after))
        suffix = f"/dataloader_idx_{dataloader}"
        scalars: dict = {}
        for row in metrics:
            for key, value in row.items():
                if key.endswith(suffix) and value:
                    scalars.setdefault(key.removesuffix(suffix), {})[int(row["step"])] = float(
                        value
                    )
        _assert_lightning_curves(scalars, before, after)
        for step, previous, current in ((2, None, before), (4, before, after)):
            path = log_dir / "val" / "samples" / f"dataloader_idx_{dataloader}_step{step:07d}.csv"
            assert read_csv(path) == as_csv(expected_table(previous, current, rows=3))


def test_lightning_without_records_dir_logs_no_table(offline):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")  # the tiny model
    CSVLogger = pytest.importorskip("lightning.pytorch.loggers").CSVLogger
    from torch.utils.data import DataLoader

    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
    from mllm_metrics.lightning import MultimodalLMModule

    torch.manual_seed(0)
    module = MultimodalLMModule(
        TinyLlavaForCausalLM(tiny_llava_config()), group_key="task", groups=GROUPS
    )
    logger = CSVLogger(offline / "csv", name="run")
    trainer = pl.Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, DataLoader(_batches(), batch_size=None), verbose=False)
    assert sorted(p.name for p in Path(logger.log_dir).iterdir()) == ["hparams.yaml", "metrics.csv"]


def test_lightning_ddp_logs_each_table_once_from_rank_zero(tmp_path):
    """Under DDP (2 processes) process 0 alone builds and logs the tables, from the records it
    gathered; process 1 keeps nothing and no sync is added (a missing one would hang)."""
    _tracker("tensorboard")
    pytest.importorskip("transformers")  # the job's tiny model
    job = Path(__file__).with_name("trackers_ddp_job.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(job.parent), *sys.path])}
    env |= {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(job), str(tmp_path)], env=env, check=True, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["built_tables"] for rank in ranks] == [True, False]
    _, texts = read_tensorboard(tmp_path / "tb" / "run" / "version_0")
    csv_dir = tmp_path / "csv" / "run" / "version_0" / "val" / "samples"
    assert len(list(csv_dir.iterdir())) == 4  # 2 loaders x 2 validations, once each
    for dataloader in (0, 1):
        before = _read(tmp_path / "records" / f"val_step0000002_dl{dataloader}.jsonl")
        after = _read(tmp_path / "records" / f"val_step0000004_dl{dataloader}.jsonl")
        text = texts[f"val/samples/dataloader_idx_{dataloader}/text_summary"]
        assert sorted(text) == [2, 4]
        assert parse_markdown(text[2]) == expected_markdown(None, before)
        assert parse_markdown(text[4]) == expected_markdown(before, after)
        for step, previous, current in ((2, None, before), (4, before, after)):
            path = csv_dir / f"dataloader_idx_{dataloader}_step{step:07d}.csv"
            assert read_csv(path) == as_csv(expected_table(previous, current))


# ---- transformers.Trainer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_eval_set():
    pytest.importorskip("transformers")
    from _parity import parity_model, parity_rows

    return parity_rows(parity_model())


def _evaluate_twice(tmp_path, rows, report_to):
    """``evaluate()`` at step 1 and at step 2, the end token favoured more, then less: samples
    flip both ways. Returns the records of both."""
    from _hf_setup import SpellTokenizer
    from _parity import EOS, GROUPS, parity_collate, parity_model
    from transformers import Trainer, TrainingArguments

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    model = parity_model()
    head = model.get_output_embeddings()
    streaming = StreamingMetrics(
        tokenizer=SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        records_dir=tmp_path / "records",
    )
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_eval_batch_size=2,
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
    )
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = Trainer(
            model=model,
            args=arguments,
            eval_dataset=rows,
            data_collator=parity_collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        for step, change in ((1, 0.3), (2, -0.6)):
            with torch.no_grad():
                head.bias[EOS] += change
            trainer.state.global_step = step
            trainer.evaluate()
    before = _read(tmp_path / "records" / "eval_step0000001.jsonl")
    after = _read(tmp_path / "records" / "eval_step0000002.jsonl")
    assert_flips_both_ways(before, after)
    return before, after


def _assert_trainer_curves(scalars: dict, before, after, prefix: str) -> None:
    for step, records in ((1, before), (2, after)):
        for key, value in expected_curves(records, "nll").items():
            assert scalars[prefix + key][step] == pytest.approx(value, rel=1e-6), (key, step)


def test_trainer_tensorboard(offline, hf_eval_set):
    _tracker("tensorboard")
    before, after = _evaluate_twice(offline, hf_eval_set, ["tensorboard"])
    scalars, texts = read_tensorboard(offline / "tensorboard")
    _assert_trainer_curves(scalars, before, after, "eval/")  # Trainer's eval_x -> eval/x
    text = texts["eval/samples/text_summary"]
    assert sorted(text) == [1, 2]
    assert parse_markdown(text[1]) == expected_markdown(None, before)
    assert parse_markdown(text[2]) == expected_markdown(before, after)
    html = tensorboard_html(text[2])
    assert html.count("<table>") == 3 and html.count("<tr>") == 3 + len(
        expected_lists(before, after)
    )


def test_trainer_wandb(offline, hf_eval_set):
    wandb = _tracker("wandb")
    try:
        before, after = _evaluate_twice(offline, hf_eval_set, ["wandb"])
    finally:
        wandb.finish()
        wandb.teardown()  # the service exits: its files are complete
    scalars, tables = read_wandb(offline, "train/global_step")
    _assert_trainer_curves(scalars, before, after, "eval/")
    assert sorted(tables["eval/samples"]) == [1, 2]
    assert_rows(tables["eval/samples"][1], expected_table(None, before))
    assert_rows(tables["eval/samples"][2], expected_table(before, after))


@MLFLOW_SQLITE
def test_trainer_mlflow(offline, hf_eval_set):
    mlflow = _mlflow()
    before, after = _evaluate_twice(offline, hf_eval_set, ["mlflow"])
    mlflow.flush_async_logging()  # MLflowCallback logs the values asynchronously
    uri = os.environ["MLFLOW_TRACKING_URI"]
    # The one run MLflowCallback started (and ended when the trainer was dropped).
    (run,) = mlflow.MlflowClient(uri).search_runs(["0"])
    keys = [f"eval_{key}" for key in expected_curves(after, "nll")]
    scalars, tables = read_mlflow(uri, run.info.run_id, keys)
    _assert_trainer_curves(scalars, before, after, "eval_")
    assert sorted(tables) == ["eval/samples_step0000001.json", "eval/samples_step0000002.json"]
    assert_rows(tables["eval/samples_step0000001.json"], expected_table(None, before), 1e-9)
    assert_rows(tables["eval/samples_step0000002.json"], expected_table(before, after), 1e-9)


def test_trainer_without_trackers_adds_no_callback(offline, hf_eval_set):
    pytest.importorskip("transformers")
    from _hf_setup import SpellTokenizer
    from _parity import GROUPS, parity_collate, parity_model
    from transformers import Trainer, TrainingArguments

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    model = parity_model()
    streaming = StreamingMetrics(
        tokenizer=SpellTokenizer(), group_key="task", groups=GROUPS, records_dir=offline / "records"
    )
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(offline / "out"), report_to=[], use_cpu=True, disable_tqdm=True
            ),
            eval_dataset=hf_eval_set,
            data_collator=parity_collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        callbacks = list(trainer.callback_handler.callbacks)
        trainer.evaluate()
    assert trainer.callback_handler.callbacks == callbacks


# ---- the rules, without a tracker ---------------------------------------------------------------


def _records(exact, reference="5 5"):
    return [
        {
            "index": i,
            "supervised_tokens": 2,
            "correct_tokens": 2 if e else 1,
            "exact": e,
            "nll": float(i),
            "group": "vqa",
            "prediction": "5 5",
            "reference": reference,
        }
        for i, e in enumerate(exact)
    ]


def test_flips_only_between_evaluations_of_one_eval_set():
    tables = SampleTables()
    tables.build("val/samples", _records([True, False]), stage="val", step=1)
    other = tables.build("val/samples", _records([False, True], "9 9"), stage="val", step=2)
    assert [row[0] for row in other.rows] == ["worst"]  # another eval set: no flips
    assert "different eval sets" in other.text and "no flips to compare" in other.text
    same = tables.build("val/samples", _records([True, False], "9 9"), stage="val", step=3)
    assert [row[:2] for row in same.rows] == [
        ["worst", 1],
        ["right -> wrong", 1],
        ["wrong -> right", 0],
    ]


def test_a_second_evaluation_at_the_same_step_is_no_flip():
    tables = SampleTables()
    tables.build("val/samples", _records([True, False]), stage="val", step=5)
    again = tables.build("val/samples", _records([False, True]), stage="val", step=5)
    assert [row[0] for row in again.rows] == ["worst"]
    assert "no flips" in again.text


def test_trackers_stay_optional_extras():
    """Importing the library imports no tracker, and a table library that is missing where it
    is needed (pandas, for MLflow's table) is named with the extra, in one line."""
    program = (
        "import json, sys\n"
        "import mllm_metrics, mllm_metrics.hf, mllm_metrics.trackers, mllm_metrics.lightning\n"
        "trackers = {'wandb', 'mlflow', 'tensorboard', 'tensorboardX', 'torch.utils.tensorboard'}\n"
        "loaded = sorted(trackers & set(sys.modules))\n"
        "class NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'pandas':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.modules.pop('pandas', None)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "from mllm_metrics.trackers import SampleTables, _frame\n"
        "try:\n"
        "    _frame(SampleTables().build('val/samples', [], stage='val', step=0))\n"
        "except ModuleNotFoundError as error:\n"
        "    print(json.dumps({'loaded': loaded, 'hint': str(error)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300, check=True
    )
    found = json.loads(result.stdout)
    assert found["loaded"] == []
    assert found["hint"] == (
        f"The samples table for MLflow needs pandas, which is not installed: {TRACKERS_EXTRA}"
    )
