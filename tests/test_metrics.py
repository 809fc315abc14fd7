"""The token and text metrics against independent references, and their torchmetrics behaviour."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import (
    brute_force_bit_match,
    brute_force_exact_match,
    logits_for,
    make_token_batch,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassAccuracy, MulticlassExactMatch

from mllm_metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    TextBitMatchAccuracy,
    TextExactMatch,
    TokenNLL,
    causal_lm_metrics,
    causal_shift,
)
from mllm_metrics.functional import (
    bit_match_accuracy,
    exact_match_accuracy,
    text_bit_match_accuracy,
    text_exact_match,
)

TOKEN_METRICS = [BitMatchAccuracy, ExactMatchAccuracy]
ALL_METRICS = [
    (BitMatchAccuracy, {}),
    (ExactMatchAccuracy, {}),
    (TextBitMatchAccuracy, {"alphabet": "01"}),
    (TextExactMatch, {}),
]


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


batches = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch_size": st.integers(1, 6),
        "seq_len": st.integers(1, 12),
        "vocab_size": st.integers(2, 9),
        "ignore_prob": st.sampled_from([0.0, 0.3, 0.9, 1.0]),
        "ignored_rows": st.integers(0, 3),
        "ignore_index": st.sampled_from([-100, -1]),
    }
)


@settings(max_examples=60, deadline=None)
@given(case=batches, as_logits=st.booleans())
def test_token_metrics_equal_brute_force_and_torchmetrics(case, as_logits):
    generator = torch.Generator().manual_seed(case.pop("seed"))
    ignore_index = case["ignore_index"]
    preds, target = make_token_batch(generator, **case)
    inputs = logits_for(preds, case["vocab_size"], generator) if as_logits else preds

    bit = BitMatchAccuracy(ignore_index=ignore_index)
    exact = ExactMatchAccuracy(ignore_index=ignore_index)
    bit.update(inputs, target)
    exact.update(inputs, target)

    correct, total = brute_force_bit_match(preds.tolist(), target.tolist(), ignore_index)
    hits, counted = brute_force_exact_match(preds.tolist(), target.tolist(), ignore_index)
    assert (bit.bit_match_correct.item(), bit.bit_match_total.item()) == (correct, total)
    assert (exact.exact_match_correct.item(), exact.exact_match_total.item()) == (hits, counted)
    assert bit.compute().item() == pytest.approx(_ratio(correct, total))
    assert exact.compute().item() == pytest.approx(_ratio(hits, counted))
    assert bit_match_accuracy(inputs, target, ignore_index).item() == bit.compute().item()
    assert exact_match_accuracy(inputs, target, ignore_index).item() == exact.compute().item()

    if total:  # torchmetrics' micro accuracy over the supervised positions is the same number
        reference = MulticlassAccuracy(
            num_classes=case["vocab_size"], average="micro", ignore_index=ignore_index
        )
        assert bit.compute().item() == pytest.approx(reference(preds, target).item())


def test_exact_match_differs_from_torchmetrics_only_on_all_ignored_rows():
    preds = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    target = torch.tensor([[1, 2, -100], [4, 0, 6], [-100, -100, -100], [-100, -100, -100]])
    ours = ExactMatchAccuracy()(preds, target)
    theirs = MulticlassExactMatch(num_classes=10, ignore_index=-100)(preds, target)
    assert ours.item() == pytest.approx(1 / 2)  # the two all-ignored rows are not counted
    assert theirs.item() == pytest.approx(3 / 4)  # torchmetrics counts them as matches
    supervised_rows = slice(0, 2)
    assert ours.item() == pytest.approx(
        MulticlassExactMatch(num_classes=10, ignore_index=-100)(
            preds[supervised_rows], target[supervised_rows]
        ).item()
    )


def test_hand_computed_values():
    preds = torch.tensor([[5, 1, 2, 3], [5, 4, 4, 9]])
    target = torch.tensor([[-100, 1, 2, 0], [-100, -100, 4, 9]])
    assert BitMatchAccuracy()(preds, target).item() == pytest.approx(4 / 5)
    assert ExactMatchAccuracy()(preds, target).item() == pytest.approx(1 / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_are_argmaxed_in_their_own_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    preds, target = make_token_batch(generator, 4, 10, 50)
    logits = logits_for(preds, 50, generator, dtype=dtype)
    assert logits.dtype == dtype
    for metric_class in TOKEN_METRICS:
        assert metric_class()(logits, target).item() == metric_class()(preds, target).item()


def test_causal_shift_compares_position_t_with_label_t_plus_1():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(11, (3, 7), generator=generator)
    preds, target = causal_shift(logits, labels)
    for row in range(3):
        for t in range(6):
            assert preds[row, t].item() == max(range(11), key=lambda v: logits[row, t, v].item())
            assert target[row, t].item() == labels[row, t + 1].item()
    ids_preds, ids_target = causal_shift(logits.argmax(-1), labels)
    assert torch.equal(ids_preds, preds) and torch.equal(ids_target, target)


def test_causal_shift_matches_hugging_face_loss_alignment():
    # Perfect logits for the shifted labels give zero cross-entropy in HF's formulation:
    # logits[:, t] predicts labels[:, t + 1].
    labels = torch.tensor([[-100, 3, 1, 2]])
    logits = torch.full((1, 4, 5), -30.0)
    for t in range(3):
        logits[0, t, labels[0, t + 1].clamp(min=0)] = 30.0
    preds, target = causal_shift(logits, labels)
    assert BitMatchAccuracy()(preds, target).item() == 1.0
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1)
    )
    assert loss.item() < 1e-6


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
def test_streaming_equals_one_shot(metric_class):
    generator = torch.Generator().manual_seed(2)
    batches = [make_token_batch(generator, 3, 8, 5, ignored_rows=1) for _ in range(6)]
    streaming = metric_class()
    for preds, target in batches:
        streaming.update(preds, target)
    one_shot = metric_class()
    one_shot.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(streaming.compute(), one_shot.compute())
    assert streaming.metric_state == one_shot.metric_state


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
def test_forward_returns_the_batch_value_and_accumulates(metric_class):
    generator = torch.Generator().manual_seed(3)
    batches = [make_token_batch(generator, 4, 6, 3) for _ in range(3)]
    metric = metric_class()
    for preds, target in batches:
        assert torch.equal(metric(preds, target), metric_class()(preds, target))
    everything = metric_class()
    everything.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(metric.compute(), everything.compute())


@pytest.mark.parametrize(("metric_class", "kwargs"), ALL_METRICS)
@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_compute_without_data_returns_zero_division(metric_class, kwargs, zero_division):
    metric = metric_class(zero_division=zero_division, **kwargs)
    # No "compute before update" warning: a process that got no batch computes its zeros too.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metric.compute().item() == zero_division


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
def test_all_ignored_batches_give_zero_division(metric_class):
    metric = metric_class(zero_division=1.0)
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[-100, -100]]))
    metric.update(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long))
    value = metric.compute()
    assert value.item() == 1.0 and not torch.isnan(value)
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[-100, 3]]))
    assert metric.compute().item() == 0.0


BAD_TOKEN_INPUTS = [
    pytest.param(
        torch.randn(2, 9, 5),
        torch.zeros(2, 4, dtype=torch.long),
        ValueError,
        r"\(2, 9, 5\).*\(2, 4\).*rewrote its labels.*mllm_metrics.labels",
        id="logits-longer-than-labels",
    ),
    pytest.param(
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(3, 3, dtype=torch.long),
        ValueError,
        r"\(2, 3\).*\(3, 3\)",
        id="batch-size-mismatch",
    ),
    pytest.param(
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
        TypeError,
        "signed integer dtype.*float32",
        id="float-target",
    ),
    pytest.param(
        torch.zeros(2, 3, 4, 5),
        torch.zeros(2, 3, dtype=torch.long),
        ValueError,
        "4-D tensor",
        id="logits-of-rank-4",
    ),
    pytest.param(
        torch.zeros(2, 3),
        torch.zeros(2, 3, dtype=torch.long),
        TypeError,
        "2-D floating-point",
        id="2d-float-preds",
    ),
    pytest.param(
        torch.zeros(2, 3, 4, dtype=torch.long),
        torch.zeros(2, 3, dtype=torch.long),
        TypeError,
        "3-D `preds` of dtype torch.int64",
        id="3d-int-preds",
    ),
    pytest.param(
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([[1, -200, 2], [0, 0, -100]]),
        ValueError,
        "negative label -200.*placeholder",
        id="image-placeholder-in-labels",
    ),
    pytest.param(
        torch.zeros(1, 2, 5),
        torch.tensor([[1, 7]]),
        ValueError,
        "label 7, outside the logits' vocabulary of size 5",
        id="label-beyond-vocab",
    ),
    pytest.param(
        [[1, 2]],
        torch.tensor([[1, 2]]),
        TypeError,
        "torch.Tensor, got list",
        id="list-preds",
    ),
    pytest.param(
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(6, dtype=torch.long),
        ValueError,
        "shape \\(batch, seq_len\\), got shape \\(6,\\)",
        id="1d-target",
    ),
]


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
@pytest.mark.parametrize(("preds", "target", "error", "match"), BAD_TOKEN_INPUTS)
def test_bad_token_input_is_rejected_and_keeps_the_states(
    metric_class, preds, target, error, match
):
    metric = metric_class()
    metric.update(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 3]]))
    before = {name: value.clone() for name, value in metric.metric_state.items()}
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    assert all(torch.equal(metric.metric_state[name], before[name]) for name in before)


def test_validate_args_false_skips_only_the_value_checks():
    metric = BitMatchAccuracy(validate_args=False)
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, -200]]))  # value check skipped
    assert metric.bit_match_total.item() == 2
    with pytest.raises(ValueError, match="do not line up"):  # shape checks stay: they are free
        metric.update(torch.zeros(1, 5, 3), torch.zeros(1, 2, dtype=torch.long))


def test_custom_ignore_index_is_not_a_bad_negative_label():
    metric = BitMatchAccuracy(ignore_index=-1)
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, -1]]))
    assert metric.compute().item() == 1.0
    with pytest.raises(ValueError, match="negative label -100.*`ignore_index` \\(-1\\)"):
        metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, -100]]))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ignore_index": 1.5}, TypeError),
        ({"zero_division": 2.0}, ValueError),
        ({"zero_division": "warn"}, TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        BitMatchAccuracy(**kwargs)


def test_nan_zero_division_is_allowed():
    assert torch.isnan(
        bit_match_accuracy(
            torch.zeros(1, 0, dtype=torch.long),
            torch.zeros(1, 0, dtype=torch.long),
            zero_division=float("nan"),
        )
    )


def test_counts_stay_exact_beyond_float32_precision():
    # 2**24 + 1 is the first integer float32 cannot hold; totals must be exact int64 counts.
    rows, chunk = 5, 2**22 + 1
    target = torch.zeros(1, chunk, dtype=torch.long)
    preds = target.clone()
    preds[0, :3] = 1  # three wrong tokens per update
    bit, exact = BitMatchAccuracy(), ExactMatchAccuracy()
    for _ in range(rows):
        bit.update(preds, target)
        exact.update(preds, target)
    assert bit.bit_match_total.dtype == torch.int64
    assert bit.bit_match_total.item() == rows * chunk == 2**24 + 2**22 + 5
    assert bit.bit_match_correct.item() == rows * (chunk - 3)
    assert bit.compute().item() == pytest.approx((chunk - 3) / chunk, rel=1e-7)
    assert (exact.exact_match_correct.item(), exact.exact_match_total.item()) == (0, rows)


def test_state_names_are_unique_and_int64_sums():
    names = []
    for metric_class, kwargs in ALL_METRICS:
        metric = metric_class(**kwargs)
        assert metric.full_state_update is False and metric.higher_is_better is True
        assert metric.is_differentiable is False
        assert (metric.plot_lower_bound, metric.plot_upper_bound) == (0.0, 1.0)
        for name, default in metric._defaults.items():
            assert default.dtype == torch.int64 and default.shape == ()
            assert metric._reductions[name].__name__ == "dim_zero_sum"
            names.append(name)
    assert len(names) == len(set(names)) == 8


def test_collection_keeps_the_two_metrics_apart():
    collection = causal_lm_metrics(prefix="val/")
    # Identical counts on the first batch would let torchmetrics merge metrics with equal state
    # names into one compute group; ours have unique names, so later batches still differ.
    collection.update(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]))
    collection.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [3, 4]]))
    assert collection.compute_groups == {0: ["bit_match"], 1: ["exact_match"]}
    values = collection.compute()
    assert values["val/bit_match"].item() == pytest.approx(5 / 6)
    assert values["val/exact_match"].item() == pytest.approx(2 / 3)


def test_collection_kwargs_reach_both_metrics():
    collection = causal_lm_metrics(ignore_index=0, sync_on_compute=False)
    for metric in collection.values():
        assert metric.ignore_index == 0 and metric.sync_on_compute is False
    with pytest.raises(ValueError, match="negative label -5"):  # checked once, by the collection
        collection.update(torch.tensor([[1, 2]]), torch.tensor([[1, -5]]))
    assert all(value.item() == 0 for m in collection.values() for value in m.metric_state.values())
    unchecked = causal_lm_metrics(validate_args=False)
    unchecked.update(torch.tensor([[1, 2]]), torch.tensor([[1, -5]]))


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
def test_state_dict_pickle_clone_reset(metric_class):
    generator = torch.Generator().manual_seed(4)
    preds, target = make_token_batch(generator, 5, 7, 4)
    metric = metric_class()
    metric.update(preds, target)

    assert metric.state_dict() == {}  # torchmetrics states are not persistent by default
    metric.persistent(True)
    restored = metric_class()
    restored.persistent(True)
    restored.load_state_dict(metric.state_dict())
    assert restored.metric_state == metric.metric_state

    unpickled = pickle.loads(pickle.dumps(metric))
    assert torch.equal(unpickled.compute(), metric.compute())

    clone = metric.clone()
    clone.update(preds, target)
    assert clone.metric_state != metric.metric_state  # the clone does not share its states
    assert copy.deepcopy(metric).metric_state == metric.metric_state

    metric.reset()
    assert all(value.item() == 0 for value in metric.metric_state.values())


@pytest.mark.parametrize("metric_class", TOKEN_METRICS)
def test_merge_state_sums(metric_class):
    generator = torch.Generator().manual_seed(5)
    first, second = (make_token_batch(generator, 4, 5, 3, ignored_rows=1) for _ in range(2))
    left, right, both = metric_class(), metric_class(), metric_class()
    left.update(*first)
    right.update(*second)
    both.update(*first)
    both.update(*second)
    left.merge_state(right)
    assert left.metric_state == both.metric_state
    left.merge_state({name: torch.tensor(0) for name in right.metric_state})
    assert left.metric_state == both.metric_state


@pytest.mark.parametrize(("metric_class", "kwargs"), ALL_METRICS)
def test_plot(metric_class, kwargs):
    pytest.importorskip("matplotlib")
    metric = metric_class(**kwargs)
    if metric_class in TOKEN_METRICS:
        metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    else:
        metric.update(["01"], ["00"])
    figure, axis = metric.plot()
    assert figure is not None and axis.get_ylim()[1] >= 0.5
    figure, axis = metric.plot([metric.compute(), metric.compute()])
    assert len(axis.get_lines()) >= 1


TEXT_BIT_CASES = [
    # (preds, target, alphabet, correct, total), worked by hand
    (["0110"], ["0110"], None, 4, 4),
    (["0110"], ["0111"], None, 3, 4),
    (["01"], ["0110"], None, 2, 4),  # missing characters are errors
    (["011011"], ["0110"], None, 4, 6),  # extra characters are errors
    ([""], [""], None, 0, 0),
    ([""], ["01"], None, 0, 2),
    (["0 1 1"], ["011"], "01", 3, 3),  # spaces dropped by the alphabet
    (["0 1 1"], ["011"], None, 2, 5),  # without the alphabet: "0" and the 3rd "1" line up
    (["bits: 10"], ["10"], "01", 2, 2),
    (["abc"], ["01"], "01", 0, 2),
    (["10", "1", ""], ["10", "11", "0"], "01", 3, 5),
]


@pytest.mark.parametrize(("preds", "target", "alphabet", "correct", "total"), TEXT_BIT_CASES)
def test_text_bit_match_hand_worked(preds, target, alphabet, correct, total):
    metric = TextBitMatchAccuracy(alphabet=alphabet)
    metric.update(preds, target)
    assert metric.text_bit_match_correct.item() == correct
    assert metric.text_bit_match_total.item() == total
    expected = correct / total if total else 0.0
    assert metric.compute().item() == pytest.approx(expected)
    assert text_bit_match_accuracy(preds, target, alphabet).item() == pytest.approx(expected)


def test_text_exact_match_hand_worked():
    metric = TextExactMatch()
    metric.update(["0110", "01", "", "1"], ["0110", "011", "", " 1"])
    assert (metric.text_exact_match_correct.item(), metric.text_exact_match_total.item()) == (2, 4)
    metric.update("x", "x")  # one string is one sample
    assert metric.compute().item() == pytest.approx(3 / 5)
    assert text_exact_match([], []).item() == 0.0


@pytest.mark.parametrize("metric_class", [TextBitMatchAccuracy, TextExactMatch])
@pytest.mark.parametrize(
    ("preds", "target", "error", "match"),
    [
        (["0", "1"], ["0"], ValueError, "2 predicted strings but 1 target"),
        ([[0, 1]], ["01"], TypeError, "holding list.*decode them first"),
        (torch.tensor([1, 2]), ["01"], TypeError, "got Tensor"),
    ],
)
def test_bad_text_input_is_rejected_and_keeps_the_states(metric_class, preds, target, error, match):
    metric = metric_class()
    metric.update(["01"], ["00"])
    before = dict(metric.metric_state)
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    assert metric.metric_state == before


def test_importing_the_package_imports_neither_lightning_nor_transformers():
    code = (
        "import sys, torchmetrics\n"
        "before = set(sys.modules)\n"
        "import mllm_metrics, mllm_metrics.functional, mllm_metrics.metrics\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(added & {'lightning', 'pytorch_lightning', 'transformers'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_token_nll_is_the_token_weighted_mean_over_batches():
    generator = torch.Generator().manual_seed(6)
    batches = []
    for length in (3, 9):  # batches of different token counts: a mean of means would be wrong
        logits = torch.randn(2, length, 7, generator=generator)
        target = torch.randint(7, (2, length), generator=generator)
        target[0, : length // 2] = -100
        batches.append((logits, target))
    metric = TokenNLL()
    for logits, target in batches:
        metric.update(logits, target)
    all_logits = torch.cat([logits.flatten(0, 1) for logits, _ in batches])
    all_target = torch.cat([target.flatten() for _, target in batches])
    expected = F.cross_entropy(all_logits, all_target, ignore_index=-100)
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6)
    mean_of_means = sum(F.cross_entropy(x.flatten(0, 1), t.flatten()) for x, t in batches) / 2
    assert metric.compute().item() != pytest.approx(mean_of_means.item(), rel=1e-3)
    assert metric.nll_tokens.item() == int((all_target != -100).sum())
    assert metric.higher_is_better is False and metric.nll_sum.dtype == torch.float64


def test_token_nll_without_tokens_is_nan_and_rejects_ids():
    metric = TokenNLL()
    metric.update(torch.randn(1, 2, 3), torch.tensor([[-100, -100]]))
    assert torch.isnan(metric.compute())
    with pytest.raises(ValueError, match="needs the full distribution"):
        metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]))


def test_collection_takes_the_argmax_once_and_checks_logits(monkeypatch):
    import mllm_metrics.metrics as metrics_module

    argmaxed = []
    original = metrics_module._argmax_ids

    def counting(preds):
        argmaxed.append(preds.ndim == 3)
        return original(preds)

    monkeypatch.setattr(metrics_module, "_argmax_ids", counting)
    generator = torch.Generator().manual_seed(7)
    preds, target = make_token_batch(generator, 3, 5, 6)
    logits = logits_for(preds, 6, generator)
    from_logits, from_ids = causal_lm_metrics(), causal_lm_metrics()
    batch_values = from_logits(logits, target)
    assert argmaxed.count(True) == 1  # one argmax over the vocabulary for both metrics
    from_ids.update(preds, target)
    assert from_logits.compute() == from_ids.compute() == batch_values
    with pytest.raises(ValueError, match="outside the logits' vocabulary"):
        from_logits.update(logits[:, :, :3], target)
