"""Real DDP: 2 CPU processes on gloo give exactly the single-process values over all the data."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _reference import make_token_batch

from mllm_metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    TextBitMatchAccuracy,
    TextExactMatch,
    causal_lm_metrics,
)

WORLD_SIZE = 2


def _token_batches(seed: int, count: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [make_token_batch(generator, 3, seq_len, 6, ignored_rows=i % 2) for i in range(count)]


def _text_batches(seed: int, count: int) -> list[tuple[list[str], list[str]]]:
    generator = torch.Generator().manual_seed(seed)

    def bits(length: int) -> str:
        return "".join(
            str(bit) for bit in torch.randint(2, (length,), generator=generator).tolist()
        )

    return [([bits(4), bits(3)], [bits(4), bits(5)]) for _ in range(count)]


# Per scenario, each rank's share of the data: uneven batch counts, a rank with no data at all,
# and a different sequence length on each rank.
SCENARIOS = {
    "uneven": ([_token_batches(0, 5, 7), _token_batches(1, 2, 7)], [_text_batches(0, 3), []]),
    "one_rank_empty": ([_token_batches(2, 4, 6), []], [[], _text_batches(1, 2)]),
    "different_lengths": ([_token_batches(3, 2, 5), _token_batches(4, 3, 11)], [[], []]),
}


def _evaluate(token_batches, text_batches) -> dict[str, torch.Tensor]:
    bit, exact = BitMatchAccuracy(), ExactMatchAccuracy()
    collection = causal_lm_metrics(prefix="val/")
    text_bit, text_exact = TextBitMatchAccuracy(alphabet="01"), TextExactMatch()
    for preds, target in token_batches:
        bit.update(preds, target)
        exact.update(preds, target)
        collection.update(preds, target)
    for preds, target in text_batches:
        text_bit.update(preds, target)
        text_exact.update(preds, target)
    values = {"bit_match": bit.compute(), "exact_match": exact.compute()}
    values |= collection.compute()
    values |= {"text_bit_match": text_bit.compute(), "text_exact_match": text_exact.compute()}
    # The ratio would hide a doubled count (2c / 2t = c / t): compare the synced counts too.
    for metric in (bit, exact, text_bit, text_exact):
        with metric.sync_context():
            values |= {name: value.clone() for name, value in metric.metric_state.items()}
    return values


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, (token_shares, text_shares) in SCENARIOS.items():
            results[(name, rank)] = _evaluate(token_shares[rank], text_shares[rank])
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    init_file = str(tmp_path_factory.mktemp("ddp") / "init")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(init_file, results), nprocs=WORLD_SIZE, join=True)
        return dict(results)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # a rank without text data
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_processes_equal_one_process_exactly(ddp_results, scenario):
    token_shares, text_shares = SCENARIOS[scenario]
    single = _evaluate(
        [batch for share in token_shares for batch in share],
        [batch for share in text_shares for batch in share],
    )
    for rank in range(WORLD_SIZE):
        synced = ddp_results[(scenario, rank)]
        assert synced.keys() == single.keys()
        for name, value in single.items():
            assert torch.equal(synced[name], value), (scenario, rank, name, synced[name], value)
