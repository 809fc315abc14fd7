"""Per-group metrics and per-sample records against brute-force references."""

from __future__ import annotations

import json

import pytest
import torch
from _reference import (
    brute_force_bit_match,
    brute_force_exact_match,
    favour_token,
    grouped_batches,
    make_token_batch,
    processed_labels_by_hand,
)
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from mllm_metrics import BitMatchAccuracy, ExactMatchAccuracy, GroupedMetric, TokenNLL
from mllm_metrics.records import SampleRecords

GROUPS = ("vqa", "ocr", "caption")


# ---- GroupedMetric -------------------------------------------------------------------------


def _random_groups(generator, rows, count=2):
    """Rows of the first ``count`` groups only: the last group never has data."""
    return [GROUPS[i] for i in torch.randint(count, (rows,), generator=generator).tolist()]


def test_each_group_equals_the_metric_on_that_groups_rows_alone():
    generator = torch.Generator().manual_seed(0)
    bit = GroupedMetric(BitMatchAccuracy(), GROUPS)
    exact = GroupedMetric(ExactMatchAccuracy(), GROUPS)
    seen = {group: ([], []) for group in GROUPS}
    for batch in range(6):
        preds, target = make_token_batch(generator, 5, 7, 11, ignored_rows=batch % 2)
        group = _random_groups(generator, 5)
        bit.update(preds, target, group)
        exact.update(preds, target, group)
        for row, name in enumerate(group):
            seen[name][0].append(preds[row].tolist())
            seen[name][1].append(target[row].tolist())
    bit_values, exact_values = bit.compute(), exact.compute()
    for slot, name in enumerate(GROUPS):
        preds, target = seen[name]
        correct, total = brute_force_bit_match(preds, target, -100)
        hits, counted = brute_force_exact_match(preds, target, -100)
        # Raw counts first: a ratio could hide two errors that cancel.
        assert bit.sums[0][slot] == correct
        assert bit.sums[1][slot] == total
        assert exact.sums[0][slot] == hits
        assert exact.sums[1][slot] == counted
        # No data, no number: a group without a supervised position has no value at all.
        assert (name in bit_values) == (total > 0)
        assert (name in exact_values) == (counted > 0)
        if counted:
            assert exact_values[name].item() == pytest.approx(hits / counted)
        if total:
            assert bit_values[name].item() == pytest.approx(correct / total)
            # torchmetrics' own micro accuracy on the group's rows
            reference = MulticlassAccuracy(num_classes=11, average="micro", ignore_index=-100)
            reference.update(torch.tensor(preds), torch.tensor(target))
            assert bit_values[name].item() == pytest.approx(reference.compute().item())
    # The last group had no row: it is left out of the macro mean.
    assert bit.sums[1][2] == 0
    with_data = [bit_values[name].item() for name in GROUPS[:2]]
    assert bit_values["macro"].item() == pytest.approx(sum(with_data) / 2)
    with_data = [exact_values[name].item() for name in GROUPS[:2]]
    assert exact_values["macro"].item() == pytest.approx(sum(with_data) / 2)


def test_grouped_nll_equals_the_nll_of_each_groups_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, 9, generator=generator)
    target = torch.randint(9, (6, 5), generator=generator)
    target[:, :2] = -100
    group = torch.tensor([0, 1, 0, 0, 1, 1])  # positions in `groups`, as a tensor
    grouped = GroupedMetric(TokenNLL(), GROUPS)
    grouped.update(logits, target, group)
    values = grouped.compute()
    for slot, name in enumerate(GROUPS[:2]):
        rows = group == slot
        expected = torch.nn.functional.cross_entropy(
            logits[rows].reshape(-1, 9).double(), target[rows].flatten(), ignore_index=-100
        )
        assert values[name].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "caption" not in values  # no data, no loss (as for every metric)


def test_names_and_positions_give_the_same_counts():
    generator = torch.Generator().manual_seed(2)
    preds, target = make_token_batch(generator, 8, 6, 7)
    names = _random_groups(generator, 8, count=3)
    positions = torch.tensor([GROUPS.index(name) for name in names])
    by_name, by_position = (GroupedMetric(BitMatchAccuracy(), GROUPS) for _ in range(2))
    by_name.update(preds, target, names)
    by_position.update(preds, target, positions)
    assert torch.equal(by_name.sums[0], by_position.sums[0])
    assert torch.equal(by_name.sums[1], by_position.sums[1])


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        (["vqa", "math"], ValueError, "'math', which is not one of the groups"),
        (torch.tensor([0, 3]), ValueError, "position 3, outside the 3 groups"),
        (torch.tensor([0, -1]), ValueError, "position -1"),
        (["vqa"], ValueError, "groups for 1 rows, but the batch has 2 rows"),
        (torch.tensor([0.0, 1.0]), TypeError, "dtype torch.float32"),
        ("vqa", TypeError, "got str"),
        ([0, 1], TypeError, "as an integer tensor"),
    ],
)
def test_a_bad_group_is_a_clear_error_that_changes_nothing(group, error, match):
    metric = GroupedMetric(BitMatchAccuracy(), GROUPS)
    metric.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 0]]), ["vqa", "ocr"])
    before = tuple(state.clone() for state in metric.sums)
    with pytest.raises(error, match=match):
        metric.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 4]]), group)
    with pytest.raises(error, match=match):
        metric(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 4]]), group)
    assert torch.equal(metric.sums[0], before[0])
    assert torch.equal(metric.sums[1], before[1])
    assert metric._update_count == 1


def test_groupings_of_other_groups_never_share_a_compute_group():
    from torchmetrics import MetricCollection

    # Equal states after the first batch would let MetricCollection merge the two.
    collection = MetricCollection(
        {
            "ab": GroupedMetric(BitMatchAccuracy(), ["a", "b"]),
            "ba": GroupedMetric(BitMatchAccuracy(), ["b", "a"]),
        },
        compute_groups=True,
    )
    preds, target = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [3, 0]])
    collection.update(preds, target, group=["a", "b"])
    collection.update(preds, target, group=["a", "a"])
    values = collection.compute()
    # "a": rows 1/2, 1/2, 1/2 -> 3/6; "b": 1/2 -> 1/2; the same whatever the order of the names.
    assert values["ab_a"] == values["ba_a"] == pytest.approx(3 / 6)
    assert len(collection.compute_groups) == 2


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        (["a", "a"], "distinct"),
        (["a", "macro"], "'macro' cannot be a group name"),
        ([], "non-empty"),
        (["a", ""], "non-empty"),
        ("ab", "sequence of group names"),
    ],
)
def test_bad_group_names_are_rejected(groups, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GroupedMetric(BitMatchAccuracy(), groups)


def test_only_token_metrics_can_be_grouped():
    with pytest.raises(TypeError, match="BitMatchAccuracy, ExactMatchAccuracy or TokenNLL"):
        GroupedMetric(MulticlassAccuracy(num_classes=3), GROUPS)


# ---- SampleRecords -------------------------------------------------------------------------


def test_records_are_written_in_key_order_with_their_position_as_index(tmp_path):
    records = SampleRecords()
    records.add([(4, 0), (0, 1)], {"exact": [True, None]})
    records.add([(0, 0)], {"exact": [False]})
    path = records.write(tmp_path / "val_step0000001.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"index": 0, "exact": False},
        {"index": 1, "exact": None},
        {"index": 2, "exact": True},
    ]
    assert len(records) == 0 and list(tmp_path.iterdir()) == [path]  # no partial file left


def test_records_reject_columns_that_do_not_line_up():
    records = SampleRecords()
    with pytest.raises(ValueError, match="2 keys for columns of lengths"):
        records.add([(0, 0), (1, 0)], {"exact": [True]})
    records.add([(0, 0)], {"exact": [True]})
    with pytest.raises(ValueError, match="fields"):
        records.add([(1, 0)], {"nll": [1.0]})


# ---- MultimodalLMModule --------------------------------------------------------------------

pl = pytest.importorskip("lightning.pytorch")


class _SpellTokenizer:
    """Decodes ids as their numbers: an independent stand-in for a real tokenizer."""

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(token) for token in sequence) for sequence in sequences]


def _trainer(**kwargs):
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return pl.Trainer(**(options | kwargs))


def _tiny_llava(**overrides):
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config

    torch.manual_seed(0)
    return favour_token(TinyLlavaForCausalLM(tiny_llava_config(**overrides))).eval()


def _batches(seed=0, count=3, as_positions=False):
    """Pre-collated batches of 3 rows (0, 1 and 2 images), each row in a group ("caption" never
    occurs); the third row of the last batch is truncated to its prompt by
    `tokenizer_model_max_length` in some tests."""
    return grouped_batches(GROUPS, seed, count, as_positions)


def _reference_samples(model, batches, max_length=None):
    """Each sample's record fields, brute force from the full logits and hand-made labels."""
    samples = []
    with torch.no_grad():
        for batch in batches:
            model_batch = {k: v for k, v in batch.items() if k != "task"}
            logits = model(**model_batch).logits
            labels = processed_labels_by_hand(model, model_batch, max_length=max_length)
            log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            preds = logits[:, :-1].argmax(-1)
            names = batch["task"]
            if isinstance(names, torch.Tensor):
                names = [GROUPS[i] for i in names.tolist()]
            for row in range(len(preds)):
                pairs = [
                    (int(p), int(t), log_probs[row, j, t].item() if t != -100 else 0.0)
                    for j, (p, t) in enumerate(zip(preds[row], labels[row, 1:]))
                    if t != -100
                ]
                samples.append(
                    {
                        "supervised_tokens": len(pairs),
                        "correct_tokens": sum(p == t for p, t, _ in pairs),
                        "exact": all(p == t for p, t, _ in pairs) if pairs else None,
                        "nll": -sum(lp for _, _, lp in pairs),
                        "group": names[row],
                        "prediction": " ".join(str(p) for p, _, _ in pairs),
                        "reference": " ".join(str(t) for _, t, _ in pairs),
                    }
                )
    return samples


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_records_equal(records, expected):
    assert [r["index"] for r in records] == list(range(len(expected)))
    for record, reference in zip(records, expected, strict=True):
        assert record["nll"] == pytest.approx(reference["nll"], rel=1e-5, abs=1e-6)
        assert {k: v for k, v in record.items() if k not in ("index", "nll")} == {
            k: v for k, v in reference.items() if k != "nll"
        }


def _group_values(samples, stage="val"):
    """Logged per-group values and macros, from the reference samples."""
    values = {}
    for name in GROUPS:
        rows = [s for s in samples if s["group"] == name]
        supervised = sum(s["supervised_tokens"] for s in rows)
        counted = [s["exact"] for s in rows if s["exact"] is not None]
        if supervised:  # no data, no number: a group without one is not logged at all
            values[f"{stage}/bit_match/{name}"] = (
                sum(s["correct_tokens"] for s in rows) / supervised
            )
            values[f"{stage}/exact_match/{name}"] = sum(counted) / len(counted)
            values[f"{stage}/loss/{name}"] = sum(s["nll"] for s in rows) / supervised
    for metric in ("bit_match", "exact_match"):
        with_data = [
            values[f"{stage}/{metric}/{name}"]
            for name in GROUPS
            if f"{stage}/{metric}/{name}" in values
        ]
        values[f"{stage}/{metric}/macro"] = sum(with_data) / len(with_data)
    return values


def _assert_logged(results, expected):
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-5), name
    # Exactly the groups that have data are logged (plus the macro means).
    assert {name for name in results if name.count("/") == 2} == set(expected)


@pytest.mark.parametrize("chunk", [256, 2, None], ids=["chunked", "small-chunks", "whole-logits"])
@pytest.mark.parametrize("as_positions", [False, True], ids=["names", "positions"])
def test_validate_logs_groups_and_writes_records_equal_to_brute_force(
    tmp_path, chunk, as_positions
):
    from mllm_metrics.lightning import MultimodalLMModule

    model, batches = _tiny_llava(tokenizer_model_max_length=9), _batches(as_positions=as_positions)
    expected = _reference_samples(model, batches, max_length=9)
    assert any(s["exact"] is None for s in expected)  # a row truncated down to its prompt
    assert {True, False} <= {s["exact"] for s in expected}
    module = MultimodalLMModule(
        model,
        tokenizer=_SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        records_dir=tmp_path,
        logits_chunk_size=chunk,
    )
    [results] = _trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)
    _assert_records_equal(_read(tmp_path / "val_step0000000.jsonl"), expected)
    _assert_logged(results, _group_values(expected))
    assert "val/loss/macro" not in results
    assert [p.name for p in tmp_path.iterdir()] == ["val_step0000000.jsonl"]


def test_fit_writes_one_file_per_validation_and_none_for_the_sanity_check(tmp_path):
    from mllm_metrics.lightning import MultimodalLMModule

    model, batches = _tiny_llava(), _batches()
    module = MultimodalLMModule(
        model, group_key="task", groups=GROUPS, records_dir=tmp_path, learning_rate=0.0
    )
    loader = DataLoader(batches, batch_size=None)
    train = DataLoader(batches[:2], batch_size=None)  # 2 steps per epoch: validations at 2, 4
    model.train()
    trainer = _trainer(max_epochs=2, num_sanity_val_steps=1)
    trainer.fit(module, train, [loader, DataLoader(batches[:1], batch_size=None)])
    model.eval()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "val_step0000002_dl0.jsonl",
        "val_step0000002_dl1.jsonl",
        "val_step0000004_dl0.jsonl",
        "val_step0000004_dl1.jsonl",
    ]
    # learning_rate=0: the weights do not move, so every file equals the reference.
    expected = _reference_samples(model, batches)
    for step in ("0000002", "0000004"):
        records = _read(tmp_path / f"val_step{step}_dl0.jsonl")
        _assert_records_equal(
            records,
            [
                {k: v for k, v in s.items() if k not in ("prediction", "reference")}
                for s in expected
            ],
        )
        assert len(_read(tmp_path / f"val_step{step}_dl1.jsonl")) == 3


def test_the_group_key_never_reaches_the_model_in_any_step(tmp_path):
    from mllm_metrics.lightning import MultimodalLMModule

    model, batches = _tiny_llava(), _batches()
    module = MultimodalLMModule(model, group_key="task", groups=GROUPS)
    loader = DataLoader(batches, batch_size=None)
    model.train()
    _trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0).fit(module, loader, loader)
    _trainer().test(module, loader, verbose=False)
    [predictions] = _trainer().predict(module, DataLoader(batches[:1], batch_size=None))
    assert predictions["preds"].shape[0] == 3


def test_unknown_group_in_a_batch_is_a_clear_error():
    from mllm_metrics.lightning import MultimodalLMModule

    batches = _batches(count=1)
    batches[0]["task"] = ["vqa", "math", "ocr"]
    module = MultimodalLMModule(_tiny_llava(), group_key="task", groups=GROUPS)
    with pytest.raises(ValueError, match="'math', which is not one of the groups"):
        _trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)
    del batches[0]["task"]
    with pytest.raises(ValueError, match="no 'task'"):
        _trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)


def test_group_key_and_groups_go_together():
    from mllm_metrics.lightning import MultimodalLMModule

    with pytest.raises(ValueError, match="go together"):
        MultimodalLMModule(_tiny_llava(), group_key="task")
    with pytest.raises(ValueError, match="go together"):
        MultimodalLMModule(_tiny_llava(), groups=GROUPS)
