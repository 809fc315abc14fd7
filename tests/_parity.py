"""One eval set with every feature at once, and its independent reference, for the parity tests.

The tiny LLaVA-style model (labels rewritten inside forward, rows truncated to 9 positions)
with the end token favoured, 7 rows of 2 groups ("chart", the third, never occurs), answers
that are the model's own greedy answers (some corrupted), and a row whose answer the truncation
removes. The reference is brute force in plain Python: the full logits of each batch as
``Trainer`` and Lightning form them (2 rows), the processed labels rebuilt by hand, and a
batch-size-1 greedy loop that recomputes the whole forward at every step.
"""

from __future__ import annotations

import torch
from _hf_setup import SpellTokenizer
from _reference import favour_token, processed_labels_by_hand

from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch, tiny_llava_config

EOS = 2
GROUPS = ("vqa", "ocr", "chart")
MAX_NEW_TOKENS = 6
MAX_LENGTH = 9
BATCH_SIZE = 2


def parity_model() -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    model = TinyLlavaForCausalLM(tiny_llava_config(tokenizer_model_max_length=MAX_LENGTH))
    return favour_token(model, token=EOS, bias=0.2).eval()


@torch.no_grad()
def _next_logits(model, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    length = model.config.tokenizer_model_max_length
    model.config.tokenizer_model_max_length = None  # the answer grows past it
    try:
        return model(**make_multimodal_batch([ids], [[]], image)).logits[0, -1]
    finally:
        model.config.tokenizer_model_max_length = length


def greedy_reference(model, prompt: list[int], image: torch.Tensor) -> list[int]:
    """Greedy decoding of one row, the whole forward recomputed at every step."""
    answer: list[int] = []
    for _ in range(MAX_NEW_TOKENS):
        token = int(_next_logits(model, prompt + answer, image).argmax())
        answer.append(token)
        if token == EOS:
            break
    return answer


def parity_rows(model, count: int = 7, seed: int = 0) -> list[dict]:
    """Rows in the forward's own names (``input_ids``, ``labels``, ``images``) and ``task``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        image = torch.rand(1, 1, 8, 8, generator=generator)
        prompt = [1, -200] + torch.randint(3, 60, (i % 5,), generator=generator).tolist()
        answer = greedy_reference(model, prompt, image)[:4]
        if answer[-1] != EOS:
            answer.append(EOS)
        if i % 3 == 1:  # a wrong first token: free-running answers then drift
            answer = [3 + (answer[0] - 2) % 50] + answer[1:] if len(answer) > 1 else [7, EOS]
        rows.append(parity_row(i, prompt, answer, image))
    return rows


def parity_row(i: int, prompt: list[int], answer: list[int], image: torch.Tensor) -> dict:
    """The ``i``-th row: the answer supervised, the prompt not, the group alternating."""
    return {
        "input_ids": prompt + answer,
        "labels": [-100] * len(prompt) + answer,
        "images": image,
        "task": GROUPS[i % 2],
    }


def parity_streaming(records_dir):
    """The StreamingMetrics of the parity jobs: raw counts, text, groups, answers, records."""
    from _hf_setup import counting_metrics

    from mllm_metrics.hf import StreamingMetrics

    return StreamingMetrics(
        counting_metrics(),
        tokenizer=SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        generate_max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=EOS,
        records_dir=records_dir,
    )


#: Keys of Trainer's results that are not metrics of ours.
NOT_METRICS = ("_loss", "_runtime", "_samples_per_second", "_steps_per_second", "_time")


def trainer_metrics(results: dict) -> dict:
    """Trainer's results without its own entries (loss, runtimes, epoch)."""
    return {
        key: value
        for key, value in results.items()
        if key != "epoch" and not key.endswith(NOT_METRICS)
    }


def expected_with_counts(samples: list[dict]) -> dict:
    """Every value of the reference, and the raw counts of `counting_metrics()`."""
    counts = {
        "rows": len(samples),
        "supervised_tokens": sum(s["supervised_tokens"] for s in samples),
        "correct_tokens": sum(s["correct_tokens"] for s in samples),
    }
    return expected_values(samples) | counts


def parity_collate(rows: list[dict]) -> dict:
    prompts, answers = [], []
    for row in rows:
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        prompts.append(row["input_ids"][:start])
        answers.append(row["input_ids"][start:])
    batch = make_multimodal_batch(prompts, answers, torch.cat([row["images"] for row in rows]))
    if all("task" in row for row in rows):  # Trainer drops columns its forward does not name
        batch["task"] = [row["task"] for row in rows]
    return batch


def _positional(a: list, b: list) -> tuple[int, int]:
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


@torch.no_grad()
def expected_samples(model, rows: list[dict]) -> list[dict]:
    """Each sample's record, in data-set order, by brute force."""
    decode = SpellTokenizer().batch_decode
    samples = []
    for start in range(0, len(rows), BATCH_SIZE):
        part = rows[start : start + BATCH_SIZE]
        batch = parity_collate(part)
        inputs = {k: v for k, v in batch.items() if k != "task"}
        logits = model(**inputs).logits.double()
        labels = processed_labels_by_hand(model, inputs)
        log_probs = torch.log_softmax(logits, dim=-1)
        for row, row_logits, row_log_probs, row_labels in zip(
            part, logits, log_probs, labels.tolist()
        ):
            preds = row_logits[:-1].argmax(-1).tolist()
            pairs = [(p, t, j) for j, (p, t) in enumerate(zip(preds, row_labels[1:])) if t != -100]
            answer_start = next(i for i, label in enumerate(row["labels"]) if label != -100)
            reference = row["labels"][answer_start:]
            generated = greedy_reference(model, row["input_ids"][:answer_start], row["images"])
            [prediction, expected, generated_text] = decode(
                [[p for p, _, _ in pairs], [t for _, t, _ in pairs], generated]
            )
            samples.append(
                {
                    "supervised_tokens": len(pairs),
                    "correct_tokens": sum(p == t for p, t, _ in pairs),
                    "exact": all(p == t for p, t, _ in pairs) if pairs else None,
                    "nll": -sum(float(row_log_probs[j, t]) for _, t, j in pairs),
                    "group": row["task"],
                    "prediction": prediction,
                    "reference": expected,
                    "gen_exact": generated == reference,
                    "generated": generated_text,
                    # not record fields: what the generated metrics count
                    "_answer": generated,
                    "_reference_answer": reference,
                    "_reference_text": decode([reference])[0],
                }
            )
    return samples


def expected_values(samples: list[dict], nll_key: str = "nll") -> dict[str, float]:
    """Every value, by key, from the samples (no prefix)."""
    values: dict[str, float] = {}

    def token_values(part: list[dict]) -> tuple[float, float, float] | None:
        supervised = sum(s["supervised_tokens"] for s in part)
        counted = [s["exact"] for s in part if s["exact"] is not None]
        if not supervised:
            return None
        correct = sum(s["correct_tokens"] for s in part)
        nll = sum(s["nll"] for s in part)
        return correct / supervised, sum(counted) / len(counted), nll / supervised

    values["bit_match"], values["exact_match"], values[nll_key] = token_values(samples)
    with_text = [s for s in samples if s["supervised_tokens"]]
    correct = total = 0
    for s in with_text:
        c, t = _positional(s["prediction"], s["reference"])
        correct, total = correct + c, total + t
    values["text_bit_match"] = correct / total
    values["text_exact_match"] = sum(s["prediction"] == s["reference"] for s in with_text) / len(
        with_text
    )
    bit_values, exact_values = [], []
    for group in GROUPS:
        found = token_values([s for s in samples if s["group"] == group])
        if found is None:  # no data, no number
            continue
        values[f"bit_match/{group}"], values[f"exact_match/{group}"] = found[0], found[1]
        values[f"{nll_key}/{group}"] = found[2]
        bit_values.append(found[0])
        exact_values.append(found[1])
    values["bit_match/macro"] = sum(bit_values) / len(bit_values)
    values["exact_match/macro"] = sum(exact_values) / len(exact_values)
    correct = total = 0
    for s in samples:
        c, t = _positional(s["_answer"], s["_reference_answer"])
        correct, total = correct + c, total + t
    values["gen_bit_match"] = correct / total
    values["gen_exact_match"] = sum(s["gen_exact"] for s in samples) / len(samples)
    correct = total = 0
    for s in samples:
        c, t = _positional(s["generated"], s["_reference_text"])
        correct, total = correct + c, total + t
    values["gen_text_bit_match"] = correct / total
    values["gen_text_exact_match"] = sum(
        s["generated"] == s["_reference_text"] for s in samples
    ) / len(samples)
    return values


def record_fields(samples: list[dict]) -> list[dict]:
    """The samples as the records files hold them (``index`` first)."""
    return [
        {"index": i, **{k: v for k, v in s.items() if not k.startswith("_")}}
        for i, s in enumerate(samples)
    ]


def assert_records_match(records: list[dict], samples: list[dict], nll_rel: float = 1e-6) -> None:
    """Counts, flags and strings exactly (compared first), then the NLL to float32 rounding."""
    expected = record_fields(samples)
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        assert {k: v for k, v in got.items() if k != "nll"} == {
            k: v for k, v in want.items() if k != "nll"
        }
    for got, want in zip(records, expected, strict=True):
        assert got["nll"] == pytest_approx(want["nll"], nll_rel)


def pytest_approx(value: float, rel: float):
    import pytest

    return pytest.approx(value, rel=rel, abs=1e-6)
