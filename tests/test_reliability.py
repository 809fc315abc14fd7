"""Numbers that stay exact however the library is fed, interrupted or misused (one process).

The 2-process cases are in test_reliability_ddp.py and test_hf_ddp.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _reference import brute_force_bit_match, brute_force_exact_match
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_ddp_job import LengthSortedBatchSampler
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from mllm_metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    MllmMetricsWarning,
    TokenNLL,
    causal_lm_metrics,
)
from mllm_metrics.repeats import track_repeats, tracker_of

VOCAB = 6
TOKEN_METRICS = [BitMatchAccuracy, ExactMatchAccuracy]


def _counts(metric) -> dict[str, float]:
    return {name: value.item() for name, value in metric.metric_state.items()}


def _collection_counts(collection) -> dict[str, float]:
    return {
        f"{key}.{name}": value.item()
        for key, metric in collection.items(keep_base=True)
        for name, value in metric.metric_state.items()
    }


# ---- bad input changes nothing, through update and forward ----------------------------------

_GOOD = (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 3]]))
_BAD_TOKEN_INPUTS = {
    "placeholder-label": (torch.tensor([[1, 2]]), torch.tensor([[1, -200]])),
    "shape-mismatch": (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2]])),
    "float-target": (torch.tensor([[1, 2]]), torch.tensor([[1.0, 2.0]])),
    "uint8-target": (torch.tensor([[1, 2]]), torch.tensor([[1, 156]], dtype=torch.uint8)),
    "bool-preds": (torch.tensor([[True, False]]), torch.tensor([[1, 0]])),
    "uint8-preds": (torch.tensor([[1, 2]], dtype=torch.uint8), torch.tensor([[1, 2]])),
    "label-outside-vocab": (torch.randn(1, 2, 4), torch.tensor([[1, 9]])),
    "1d-preds": (torch.tensor([1, 2]), torch.tensor([[1, 2]])),
    "meta": (torch.empty(1, 2, dtype=torch.long, device="meta"),) * 2,
    "not-a-tensor": ([[1, 2]], torch.tensor([[1, 2]])),
}


@pytest.mark.parametrize("how", ["update", "forward"])
@pytest.mark.parametrize("case", list(_BAD_TOKEN_INPUTS))
@pytest.mark.parametrize("metric_class", TOKEN_METRICS + [causal_lm_metrics])
def test_a_bad_batch_changes_no_count(metric_class, case, how):
    metric = metric_class()
    metric.update(*_GOOD)
    metric(*_GOOD)  # forward accumulates as well
    counts = _collection_counts if metric_class is causal_lm_metrics else _counts
    before = counts(metric)
    assert any(before.values())
    with pytest.raises((TypeError, ValueError)):
        getattr(metric, how)(*_BAD_TOKEN_INPUTS[case])
    assert counts(metric) == before
    metric.update(*_GOOD)  # and it keeps counting as if the bad batch never came
    reference = metric_class()
    for _ in range(3):
        reference.update(*_GOOD)
    assert counts(metric) == counts(reference)
    torch.testing.assert_close(metric.compute(), reference.compute())


@pytest.mark.parametrize("how", ["update", "forward"])
@pytest.mark.parametrize(
    "case",
    [
        (torch.randn(1, 2, 4), torch.tensor([[1, -200]])),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]])),  # ids: the NLL needs logits
        (torch.randn(1, 2, 4), torch.tensor([[1.0, 2.0]])),
        (torch.randn(1, 3, 4), torch.tensor([[1, 2]])),
    ],
)
def test_a_bad_batch_changes_no_nll_count(case, how):
    metric = TokenNLL()
    logits, labels = torch.randn(2, 3, 4), torch.tensor([[1, -100, 3], [0, 0, 2]])
    metric(logits, labels)
    before = _counts(metric)
    with pytest.raises((TypeError, ValueError)):
        getattr(metric, how)(*case)
    assert _counts(metric) == before
    assert metric._update_count == 1


def test_forward_on_a_bad_batch_keeps_the_update_count_and_flags():
    metric = BitMatchAccuracy()
    metric(*_GOOD)
    flags = (metric._update_count, metric._to_sync, metric._should_unsync, metric._enable_grad)
    with pytest.raises(ValueError):
        metric(*_BAD_TOKEN_INPUTS["placeholder-label"])
    assert (metric._update_count, metric._to_sync, metric._should_unsync) == flags[:3]
    assert metric._enable_grad == flags[3]


# ---- one dtype rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_signed_label_width_counts_the_same(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, VOCAB, generator=generator)
    labels = torch.randint(VOCAB, (3, 5), generator=generator)
    labels[0, :2] = -100
    labels[2] = -100
    expected = {m: m() for m in (BitMatchAccuracy, ExactMatchAccuracy, TokenNLL)}
    got = {m: m() for m in expected}
    for metric_class in expected:
        expected[metric_class].update(logits, labels)
        got[metric_class].update(logits, labels.to(dtype))
        assert _counts(got[metric_class]) == pytest.approx(_counts(expected[metric_class]))


def test_uint8_labels_are_rejected_not_wrapped():
    # -100 as uint8 is 156: label 156 would silently count as ignored (bit-match 1.0, not 0.5).
    labels = torch.tensor([[5, -100]]).to(torch.uint8)
    with pytest.raises(TypeError, match="uint8.*cannot hold the negative"):
        BitMatchAccuracy().update(torch.tensor([[5, 7]]), labels)


def test_bool_predictions_are_rejected():
    with pytest.raises(TypeError, match="bool.*signed integer"):
        ExactMatchAccuracy().update(torch.tensor([[True, True]]), torch.tensor([[1, 1]]))


def test_meta_tensors_are_rejected_even_without_value_checks():
    metric = BitMatchAccuracy(validate_args=False)
    meta = torch.empty(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        metric.update(meta, meta)
    assert metric.bit_match_total.device.type == "cpu"


def test_ignore_index_equal_to_the_vocabulary_size_is_accepted():
    logits = torch.zeros(1, 3, 4)
    logits[0, :, 2] = 1.0  # always predicts 2
    labels = torch.tensor([[2, 4, 1]])  # 4 == V: the ignore index
    metric = BitMatchAccuracy(ignore_index=4)
    metric.update(logits, labels)
    assert _counts(metric) == {"bit_match_correct": 1, "bit_match_total": 2}
    nll = TokenNLL(ignore_index=4)
    nll.update(logits, labels)
    assert nll.nll_tokens.item() == 2


# ---- property: random valid and invalid batches, update and forward --------------------------


@st.composite
def _batches(draw):
    rows, length = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    labels = draw(
        st.lists(
            st.lists(st.sampled_from([-100, 0, 1, 2, 3, 4, 5]), min_size=length, max_size=length),
            min_size=rows,
            max_size=rows,
        )
    )
    target = torch.tensor(labels, dtype=torch.long).reshape(rows, length)
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(rows, length, VOCAB, generator=torch.Generator().manual_seed(seed))
    as_logits = draw(st.booleans())
    preds = logits if as_logits else logits.argmax(-1)
    fault = draw(st.sampled_from([None] * 4 + ["placeholder", "dtype", "shape", "bool", "uint8"]))
    if fault == "placeholder" and target.numel():
        target = target.clone()
        target.view(-1)[0] = -200
    elif fault == "dtype":
        target = target.float()
    elif fault == "shape":
        target = torch.zeros(rows, length + 1, dtype=torch.long)
    elif fault == "bool":
        preds = torch.zeros(rows, length, dtype=torch.bool)
    elif fault == "uint8":
        target = target.to(torch.uint8)
    else:
        fault = None
    how = draw(st.sampled_from(["update", "forward"]))
    return preds, target, logits, fault, how


def _reference_nll(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total, tokens = 0.0, 0
    for row in range(target.shape[0]):
        for t in range(target.shape[1]):
            label = int(target[row, t])
            if label != -100:
                total -= float(log_probs[row, t, label])
                tokens += 1
    return total, tokens


@settings(max_examples=60, deadline=None)
@given(st.lists(_batches(), min_size=1, max_size=8))
def test_counts_equal_brute_force_over_the_valid_batches_only(batches):
    metrics = {
        "bit": BitMatchAccuracy(),
        "exact": ExactMatchAccuracy(),
        "collection": causal_lm_metrics(),
        "nll": TokenNLL(),
    }
    preds_rows, target_rows, nll_sum, nll_tokens = [], [], 0.0, 0
    for preds, target, logits, fault, how in batches:
        for name, metric in metrics.items():
            inputs = (logits if name == "nll" and fault != "bool" else preds, target)
            if fault is None:
                getattr(metric, how)(*inputs)
            else:
                with pytest.raises((TypeError, ValueError)):
                    getattr(metric, how)(*inputs)
        if fault is None:
            ids = preds.argmax(-1) if preds.ndim == 3 else preds
            preds_rows += ids.tolist()
            target_rows += target.tolist()
            batch_nll, batch_tokens = _reference_nll(logits, target)
            nll_sum, nll_tokens = nll_sum + batch_nll, nll_tokens + batch_tokens
    correct, total = brute_force_bit_match(preds_rows, target_rows, -100)
    hits, counted = brute_force_exact_match(preds_rows, target_rows, -100)
    assert _counts(metrics["bit"]) == {"bit_match_correct": correct, "bit_match_total": total}
    assert _counts(metrics["exact"]) == {"exact_match_correct": hits, "exact_match_total": counted}
    collection = _collection_counts(metrics["collection"])
    assert collection["bit_match.bit_match_correct"] == correct
    assert collection["exact_match.exact_match_total"] == counted
    assert metrics["nll"].nll_tokens.item() == nll_tokens
    assert metrics["nll"].nll_sum.item() == pytest.approx(nll_sum, rel=1e-5, abs=1e-9)


# ---- repeated samples of a padding DistributedSampler, identified by dataset index ------------


def _rank_indices(size: int, world: int, rank: int, shuffle: bool) -> tuple[list[int], set[int]]:
    """This rank's share and its padding, written out from DistributedSampler's contract."""
    order = (
        torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
        if shuffle
        else list(range(size))
    )
    total = math.ceil(size / world) * world
    padded = (order * math.ceil(total / size))[:total]
    positions = range(rank, total, world)
    return [padded[p] for p in positions], {padded[p] for p in positions if p >= size}


def _loaders(size: int, rank: int, shuffle: bool):
    """(loader, rows of each item) for every way an evaluation loader can be built."""
    dataset = [{"index": i} for i in range(size)]
    lengths = [(7 * i) % 5 for i in range(size)]
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=shuffle, seed=0)

    def rows(batch):
        return [row["index"] for row in batch]

    yield DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=rows)
    yield DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=rows, num_workers=2)
    sorted_batches = LengthSortedBatchSampler(sampler, 3, lengths)
    yield DataLoader(dataset, batch_sampler=sorted_batches, collate_fn=rows)
    # Pre-collated items: each dataset item is already a batch of 1 to 3 rows.
    items = [[100 * i + r for r in range(1 + i % 3)] for i in range(size)]
    item_sampler = DistributedSampler(items, num_replicas=2, rank=rank, shuffle=shuffle, seed=0)
    yield DataLoader(items, batch_size=None, sampler=item_sampler)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_repeated_rows_are_found_by_dataset_index(size, rank, shuffle):
    share, padding = _rank_indices(size, 2, rank, shuffle)
    for loader in _loaders(size, rank, shuffle):
        tracked, tracker = track_repeats(loader, "test loader")
        assert (tracker is None) == (size % 2 == 0)
        if tracker is None:
            continue
        assert tracker_of(tracked) is tracker and tracker_of(loader) is None
        pre_collated = loader.batch_sampler is None
        for _epoch in range(2):  # a new iteration starts a new record
            flagged, kept = set(), []
            for batch in tracked:
                repeated = tracker.next_batch(len(batch)).repeated or [False] * len(batch)
                for value, flag in zip(batch, repeated, strict=True):
                    index = value // 100 if pre_collated else value
                    assert flag == (index in padding), (index, padding)
                    if flag:
                        flagged.add(index)
                    else:
                        kept.append(index)
            assert flagged == padding
            assert sorted(set(kept)) == sorted(set(share) - padding)
            assert len(set(kept)) == (len(kept) if not pre_collated else len(set(kept)))


def test_the_padding_is_the_one_of_the_iteration_that_drew_the_batches():
    # A callback that moves the sampler to another epoch once the loader has started (after
    # Lightning prefetched the first batch) must not change which rows are the repeats.
    dataset = list(range(7))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    share, padding = _rank_indices(7, 2, 1, shuffle=True)
    tracked, tracker = track_repeats(DataLoader(dataset, batch_size=2, sampler=sampler), "loader")
    batches = iter(tracked)
    drawn = [next(batches).tolist()]
    sampler.set_epoch(5)
    drawn += [batch.tolist() for batch in batches]
    flags = [tracker.next_batch(len(batch)).repeated or [False] * len(batch) for batch in drawn]
    flagged = {i for batch, row in zip(drawn, flags) for i, f in zip(batch, row) if f}
    assert sorted(i for batch in drawn for i in batch) == sorted(share)
    assert flagged == padding and len(padding) == 1


def test_the_padding_is_read_once_per_iteration_also_without_prefetching():
    # A loop that takes each batch's rows before drawing the next (no prefetch) empties the
    # record between batches: the padding is still read once, at the iteration's start, so a
    # `set_epoch` during the iteration changes nothing and a large eval set costs O(N), not
    # O(N) per batch.
    dataset = list(range(7))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    share, padding = _rank_indices(7, 2, 1, shuffle=True)
    tracked, tracker = track_repeats(DataLoader(dataset, batch_size=1, sampler=sampler), "loader")
    reads = 0
    fix_repeats = tracker._fix_repeats

    def counting_fix_repeats():
        nonlocal reads
        reads += 1
        fix_repeats()

    tracker._fix_repeats = counting_fix_repeats
    flagged, drawn = set(), []
    for epoch, batch in enumerate(tracked, start=1):
        (repeated,) = tracker.next_batch(1).repeated or [False]
        drawn.append(batch.item())
        if repeated:
            flagged.add(batch.item())
        sampler.set_epoch(epoch)
    assert sorted(drawn) == sorted(share) and len(drawn) == 4
    assert flagged == padding and len(padding) == 1
    assert reads == 1


def test_the_users_loader_is_left_as_it_is():
    dataset = list(range(5))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    batch_sampler = loader.batch_sampler
    tracked, tracker = track_repeats(loader, "test loader")
    assert tracked is not loader and loader.batch_sampler is batch_sampler
    assert [b.tolist() for b in loader] == [b.tolist() for b in tracked] == [[1, 3], [0]]
    assert len(tracked) == len(loader) == 2


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize(
    "build, cause",
    [
        (lambda s: DataLoader(_Stream(), batch_size=2), "IterableDataset"),
        (lambda s: DataLoader(list(range(5)), batch_size=2), "no DistributedSampler"),
        (
            lambda s: DataLoader(
                list(range(5)),
                batch_size=2,
                sampler=DistributedSampler(list(range(5)), 2, 0, shuffle=False, drop_last=True),
            ),
            "leaves out 1 of the 5",
        ),
        (
            lambda s: DataLoader(list(range(5)), batch_size=2, sampler=s, drop_last=True),
            "drops its last incomplete batch",
        ),
        (
            lambda s: DataLoader(
                list(range(5)), batch_size=2, sampler=s, num_workers=1, in_order=False
            ),
            "in_order=False",
        ),
    ],
)
def test_loaders_that_cannot_be_exact_warn_with_the_cause(build, cause):
    sampler = DistributedSampler(list(range(5)), num_replicas=2, rank=0, shuffle=False)
    with pytest.warns(UserWarning, match=cause):
        track_repeats(build(sampler), "val dataloader 0")


def test_a_loader_without_padding_has_no_repeats_and_gives_keys_without_warning():
    dataset = list(range(6))
    loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, 1, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracked, tracker = track_repeats(loader, "val dataloader 0")
        batches = [batch.tolist() for batch in tracked]
        samples = [tracker.next_batch(len(batch)) for batch in batches]
    # Rank 1 of 2 gets the odd indices; each row's key is its data-set index.
    assert batches == [[1, 3], [5]]
    assert samples == [([(1, 0), (3, 0)], None), ([(5, 0)], None)]


def test_keys_are_the_data_set_indices_through_a_reordering_batch_sampler():
    dataset = list(range(7))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=3)
    order = list(sampler)  # this rank's share, in the sampler's order

    # A batch sampler that draws the whole share, then serves it backwards in pairs.
    class Backwards:
        def __init__(self, sampler):
            self.sampler = sampler

        def __iter__(self):
            drawn = list(self.sampler)[::-1]
            return iter([drawn[i : i + 2] for i in range(0, len(drawn), 2)])

        def __len__(self):
            return 2

    tracked, tracker = track_repeats(DataLoader(dataset, batch_sampler=Backwards(sampler)), "t")
    seen = {}
    for batch in tracked:
        for index, key in zip(batch.tolist(), tracker.next_batch(len(batch)).keys):
            seen[index] = key
    # Rank 0 has 4 samples, none repeated (7 = 2 * 4 - 1: rank 1 holds the repeat); each row's
    # key is its data-set index, whatever order the batch sampler served them in.
    assert seen == {index: (index, 0) for index in order}


def test_batch_sampler_is_a_plain_batch_sampler_after_tracking():
    dataset = list(range(5))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 2, drop_last=False))
    tracked, tracker = track_repeats(loader, "test loader")
    # Lightning and users read these through the recording wrapper.
    assert tracked.batch_sampler.batch_size == 2 and tracked.batch_sampler.sampler is sampler
    assert not tracked.batch_sampler.drop_last


# ---- StreamingMetrics: whole batches or nothing, labels by identity, clear errors --------------


def _gathered(preds, target, row_nll=None):
    from mllm_metrics.hf.fields import preprocessed_fields

    row_nll = torch.zeros(len(preds)) if row_nll is None else row_nll
    return preprocessed_fields(torch.tensor(preds), torch.tensor(target), row_nll)


def test_streaming_call_with_a_bad_batch_in_a_list_adds_nothing():
    from mllm_metrics.hf import StreamingMetrics

    streaming = StreamingMetrics()
    good = _gathered([[1, 2]], [[1, 0]])
    streaming(good, compute_result=False)
    before = _collection_counts(streaming.metrics)
    bad = _gathered([[1, 2]], [[1, -200]])
    with pytest.raises(ValueError, match="-200"):
        streaming([good, good, bad], compute_result=False)
    assert _collection_counts(streaming.metrics) == before
    assert streaming.evaluation.nll.nll_tokens.item() == 2
    results = streaming([good], compute_result=True)
    assert results["bit_match"] == 0.5 and results["exact_match"] == 0.0


def test_streaming_call_accepts_lists_for_tuples():
    from mllm_metrics.hf import StreamingMetrics

    as_tuples, as_lists = StreamingMetrics(), StreamingMetrics()
    batches = [
        _gathered([[1, 2]], [[1, 0]]),
        _gathered([[3, 3]], [[3, 3]]),
        _gathered([[0]], [[5]]),
    ]
    expected = as_tuples(batches)
    assert as_lists([list(batch) for batch in batches]) == expected
    assert StreamingMetrics()(list(batches[1])) == StreamingMetrics()(batches[1])


def test_preprocess_logits_takes_only_the_exposed_labels_from_a_tuple():
    from mllm_metrics.hf import StreamingMetrics

    streaming = StreamingMetrics()
    logits = torch.randn(2, 4, VOCAB)
    other_int_field = torch.zeros(2, 4, dtype=torch.long)  # e.g. a model's own int output
    batch_labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    _, preds, target, _ = streaming.preprocess_logits((logits, other_int_field), batch_labels)
    torch.testing.assert_close(target, batch_labels[:, 1:])


def test_preprocess_logits_names_float_labels_and_accepts_int32():
    from mllm_metrics.hf import StreamingMetrics

    streaming = StreamingMetrics()
    logits = torch.randn(1, 3, VOCAB)
    with pytest.raises(TypeError, match="labels.*float32"):
        streaming.preprocess_logits(logits, torch.tensor([[0.0, 1.0, 2.0]]))
    labels = torch.tensor([[-100, 1, 2]])
    as_int64 = streaming.preprocess_logits(logits, labels)
    as_int32 = streaming.preprocess_logits(logits, labels.int())
    for a, b in zip(as_int64, as_int32, strict=True):
        torch.testing.assert_close(a, b)


# ---- a new evaluation starts from zero, after an interrupted one ------------------------------


class _Interrupt(RuntimeError):
    pass


class _FailingCollate:
    """A collate function that raises on its `fail_at`-th call while armed."""

    def __init__(self, collate, fail_at: int) -> None:
        self.collate, self.fail_at, self.calls, self.armed = collate, fail_at, 0, False

    def __call__(self, rows):
        self.calls += 1
        if self.armed and self.calls == self.fail_at:
            raise _Interrupt("interrupted on purpose")
        return self.collate(rows)


@pytest.mark.parametrize("batch_eval_metrics", [True, False])
def test_trainer_evaluate_after_an_interrupted_one_starts_from_zero(batch_eval_metrics, tmp_path):
    pytest.importorskip("transformers")
    from _hf_setup import (
        HAS_BATCH_EVAL_METRICS,
        collate_llava_style,
        counting_metrics,
        llava_style_reference,
        llava_style_rows,
        make_trainer,
        tiny_llava,
    )

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    if not HAS_BATCH_EVAL_METRICS:  # then only the last call adds: nothing can be left over
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    model = tiny_llava()
    rows = llava_style_rows(model, 7)
    expected = llava_style_reference(model, rows, batch_size=2)
    collate = _FailingCollate(collate_llava_style, fail_at=3)
    streaming = StreamingMetrics(counting_metrics())
    with expose_processed_labels(model):
        trainer = make_trainer(model, rows, collate, streaming, tmp_path, True)
        collate.armed = True
        with pytest.raises(_Interrupt):
            trainer.evaluate()  # the batches before it are in the sums when it stops
        assert streaming.metrics["supervised_tokens"].supervised_tokens.item() > 0
        left = int(streaming.metrics["rows"].rows)
        collate.armed = False
        trainer = make_trainer(model, rows, collate, streaming, tmp_path, batch_eval_metrics)
        with pytest.warns(MllmMetricsWarning, match=f"dropped the {left} rows of an evaluation"):
            results = trainer.evaluate()
    assert results["eval_rows"] == expected["rows"] == 7
    for name in ("correct_tokens", "supervised_tokens"):
        assert results[f"eval_{name}"] == expected[name], name
    assert results["eval_bit_match"] == pytest.approx(expected["bit_match"], rel=1e-6)
    assert results["eval_exact_match"] == pytest.approx(expected["exact_match"], rel=1e-6)


class _FailingModel(torch.nn.Module):
    """Runs the wrapped model; while armed, raises on the `fail_at`-th forward in eval mode."""

    def __init__(self, model, fail_at: int) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls, self.armed = model, fail_at, 0, False

    def forward(self, **batch):
        if not self.training:
            self.calls += 1
            if self.armed and self.calls == self.fail_at:
                raise _Interrupt("interrupted on purpose")
        return self.model(**batch)


def _lightning_setup():
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from _models import tiny_llama
    from test_lightning import _trainer as trainer

    from mllm_metrics.lightning import MultimodalLMModule

    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        labels = torch.randint(16, (3, 6), generator=generator)
        labels[:, :2] = -100
        batches.append({"input_ids": labels.clamp(min=0), "labels": labels})
    loader = DataLoader(batches, batch_size=None)

    def module(model, **kwargs):  # the full forward: the wrapper below cannot be split
        return MultimodalLMModule(model, logits_chunk_size=None, **kwargs)

    return tiny_llama(), loader, trainer, module


def test_lightning_validate_after_an_interrupted_one_starts_from_zero():
    model, loader, trainer, module_class = _lightning_setup()
    [expected] = trainer().validate(module_class(model), loader, verbose=False)
    failing = _FailingModel(model, fail_at=3)
    module = module_class(failing)
    failing.armed = True
    with pytest.raises(_Interrupt):
        trainer().validate(module, loader, verbose=False)
    counts = module.evaluations["val_0"].tokens["bit_match"].bit_match_total.item()
    assert counts > 0  # two batches were counted before it stopped
    failing.armed = False
    [results] = trainer().validate(module, loader, verbose=False)  # a new Trainer
    assert results == expected


def test_lightning_fit_after_an_interrupted_validation_starts_from_zero():
    model, loader, trainer, module_class = _lightning_setup()
    [expected] = trainer().validate(module_class(model), loader, verbose=False)
    failing = _FailingModel(model.train(), fail_at=2)
    module = module_class(failing, learning_rate=0.0)
    failing.armed = True
    with pytest.raises(_Interrupt):
        trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0).fit(
            module, loader, loader
        )
    failing.armed = False
    module.train()  # the interrupted validation left the model in eval mode
    fit = trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    fit.fit(module, loader, loader)
    logged = {k: v.item() for k, v in fit.callback_metrics.items() if k.startswith("val/")}
    assert logged == pytest.approx(expected, rel=1e-6)
    [results] = trainer().validate(module, loader, verbose=False)
    assert results == pytest.approx(expected, rel=1e-6)


def test_lightnings_sampler_wrapper_over_a_custom_sampler_is_understood():
    pytest.importorskip("lightning")
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    dataset = list(range(5))
    reverse = list(reversed(range(5)))  # a custom sampler: the data set backwards
    sampler = DistributedSamplerWrapper(reverse, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    tracked, tracker = track_repeats(loader, "test loader")
    # Positions 0..5 of [4, 3, 2, 1, 0, 4]: rank 1 gets positions 1, 3, 5 -> 3, 1 and a repeat 4.
    batches = [batch.tolist() for batch in tracked]
    assert batches == [[3, 1], [4]]
    assert tracker.next_batch(2) == ([(3, 0), (1, 0)], None)  # the data-set indices 3 and 1
    assert tracker.next_batch(1) == ([None], [True])


_TEXTS = st.text(alphabet="01 x", max_size=5)


@st.composite
def _text_batches(draw):
    size = draw(st.integers(0, 3))
    preds = draw(st.lists(_TEXTS, min_size=size, max_size=size))
    target = draw(st.lists(_TEXTS, min_size=size, max_size=size))
    fault = draw(st.sampled_from([None, None, None, "length", "ids"]))
    if fault == "length":
        target = target + ["0"]
    elif fault == "ids":
        preds = [[1, 0]] + preds
        target = ["10"] + target
    return preds, target, fault, draw(st.sampled_from(["update", "forward"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(_text_batches(), min_size=1, max_size=8))
def test_text_counts_equal_brute_force_over_the_valid_batches_only(batches):
    from mllm_metrics import TextBitMatchAccuracy, TextExactMatch

    bit, exact = TextBitMatchAccuracy(alphabet="01"), TextExactMatch()
    correct = total = equal = strings = 0
    for preds, target, fault, how in batches:
        for metric in (bit, exact):
            if fault is None:
                getattr(metric, how)(preds, target)
            else:
                with pytest.raises((TypeError, ValueError)):
                    getattr(metric, how)(preds, target)
        if fault is None:
            for predicted, expected in zip(preds, target, strict=True):
                p = [c for c in predicted if c in "01"]
                e = [c for c in expected if c in "01"]
                correct += sum(p[i] == e[i] for i in range(min(len(p), len(e))))
                total += max(len(p), len(e))
                equal += predicted == expected
                strings += 1
    assert _counts(bit) == {"text_bit_match_correct": correct, "text_bit_match_total": total}
    assert _counts(exact) == {"text_exact_match_correct": equal, "text_exact_match_total": strings}
