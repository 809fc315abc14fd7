"""torchrun worker of test_deepspeed.py: train, then evaluate, under DeepSpeed ZeRO-2 and ZeRO-3.

Run as ``torchrun --nproc_per_node 2 deepspeed_job.py OUT_DIR`` (CPU, ``DS_ACCELERATOR=cpu``).
Both stages run in this one launch, one after the other (accelerate's state is reset between
them). For each stage, every rank:

1. builds the model of :func:`deepspeed_model` and exposes it as the README says
   (``expose_processed_labels(model, logits_chunk_size=3, metrics=streaming)`` before the
   ``Trainer``), trains ``MAX_STEPS`` steps on :func:`training_rows`, then ``evaluate()``\\ s
   :func:`deepspeed_rows` with ``batch_eval_metrics=True``, 2 rows per device, records written to
   a folder of its own (``records/zero<stage>/rank<r>``: process 1's must stay empty);
2. records what each of its evaluation batches was and did (:class:`BatchProbe`): its rows,
   the calls of the output head, vision tower, embeddings and root model, and the collectives
   issued inside the model's forward and over the whole step;
3. saves the trained weights (gathered from the partitions under ZeRO-3) to
   ``OUT_DIR/trained_zero<stage>_rank<r>.pt``;
4. evaluates once more without the exposure and without metrics (the model's own forward;
   without ``compute_metrics`` ``Trainer`` gathers the loss only): the collectives of the same
   batches without the library, for comparison.

The eval set (7 rows; the accelerate loader gives rank r the batches r, r + 2, ...), built from
the model's own greedy answers (:func:`deepspeed_rows`; the numbers are those of this
environment):

====  ========================  ==============================================================
rank  batch (rows)              what it tests
====  ========================  ==============================================================
0     0, 1: image rows          4 supervised tokens each (8: 3 head chunks of 3); both greedy
                                answers are the end token at once (greedy decoding: 1 step)
1     2, 3: text-only rows      LLaVA's zero image per row, no placeholder; 1 + 3 supervised
                                tokens (2 chunks); greedy answers of 4 and 3 tokens (4 steps)
0     4, 5: image + text row    row 4 truncated by the model to no supervised token (1 chunk)
1     6, 0: image row + row 0   row 0 completes the last batch (Trainer's gather drops it)
====  ========================  ==============================================================

Every rank writes its results to ``OUT_DIR/rank<r>.json``; ``OUT_DIR/initial.pt`` holds the
initial weights (process 0).
"""

from __future__ import annotations

import collections
import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from _parity import (
    EOS,
    MAX_NEW_TOKENS,
    _next_logits,
    parity_collate,
    parity_row,
    parity_streaming,
)

STAGES = (2, 3)
CHUNK = 3
MAX_STEPS = 2
# Small: training must change the weights (the reference is computed on the trained ones) but
# keep the greedy decisions the eval set was built from (chosen with logit margins >= 0.02; two
# steps at 1e-4 move each weight by <= 2e-4).
LEARNING_RATE = 1e-4
# The model's truncation: an image row with 6 prompt tokens (1 + 4 image positions + 5) keeps
# no answer token; one with a 1-token prompt after the image keeps 4.
MAX_LENGTH = 10
BATCH_SIZE = 2
# The process group's timeout: a collective that one rank never joins raises after this long
# (a crash the test reports) instead of hanging until the test's own timeout. Generous for a
# loaded machine; both ranks build DeepSpeed's op (fresh machine) before any collective.
# (``TrainingArguments(ddp_timeout=...)`` does not reach the process group with ``use_cpu=True``:
# the group is created here, with DeepSpeed's own call.)
COLLECTIVE_TIMEOUT_S = 120
COLLECTIVES = (
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_to_all_single",
    "barrier",
)


def deepspeed_config(stage: int) -> dict:
    """ZeRO ``stage`` for ``TrainingArguments(deepspeed=...)``; at stage 3 every parameter is
    partitioned (DeepSpeed's default keeps the tiny model's parameters whole)."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def deepspeed_model():
    """LLaVA's forward signature and image convention (a text-only row consumes a zero image it
    does not use, so the vision tower runs on every batch of every process), truncation to
    ``MAX_LENGTH`` positions, and the end token favoured by the head's bias."""
    from _models import llava_signature_model
    from _reference import favour_token

    model = llava_signature_model(tokenizer_model_max_length=MAX_LENGTH)
    return favour_token(model, token=EOS, bias=0.2).eval()


def _greedy_with_margins(model, prompt: list[int], image: torch.Tensor):
    """The greedy answer (whole forward at every step) and, per step, the top-2 logit margin."""
    answer, margins = [], []
    for _ in range(MAX_NEW_TOKENS):
        logits = _next_logits(model, prompt + answer, image)
        top = logits.topk(2).values
        answer.append(int(logits.argmax()))
        margins.append(float(top[0] - top[1]))
        if answer[-1] == EOS:
            break
    return answer, margins


def _find(model, generator: torch.Generator, text: bool, extra: tuple[int, int], accept):
    """The first prompt (and image) of the seeded stream whose greedy answer ``accept``\\ s:
    ``[1, -200]`` (or ``[1]`` for a text row, with a zero image) and ``extra`` random tokens."""
    for _ in range(500):
        image = torch.zeros(1, 1, 8, 8) if text else torch.rand(1, 1, 8, 8, generator=generator)
        count = int(torch.randint(extra[0], extra[1] + 1, (1,), generator=generator))
        prompt = [1] + ([] if text else [-200])
        prompt += torch.randint(3, 60, (count,), generator=generator).tolist()
        answer, margins = _greedy_with_margins(model, prompt, image)
        if accept(answer, margins):
            return prompt, image, answer
    raise AssertionError("no prompt of the seeded stream fits")  # pragma: no cover


@torch.no_grad()
def deepspeed_rows(model) -> list[dict]:
    """The eval set of the module docstring, in the forward's own names and ``task``; answers
    built from the model's own greedy answers, chosen with margins that training keeps."""
    generator = torch.Generator().manual_seed(0)

    def ends_at_once(answer, margins):
        return answer == [EOS] and margins[0] >= 0.05

    def right(answer, margins):  # a whole answer the model gives, that can be labelled as is
        return 2 <= len(answer) <= 5 and answer[-1] == EOS and min(margins) >= 0.02

    found = [
        _find(model, generator, False, (1, 1), ends_at_once),
        _find(model, generator, False, (1, 1), ends_at_once),
        _find(model, generator, True, (1, 3), lambda a, m: len(a) >= 4 and min(m) >= 0.02),
        _find(model, generator, True, (1, 3), right),
        _find(model, generator, False, (5, 5), lambda a, m: a[-1] == EOS),
        _find(model, generator, True, (0, 3), right),
        _find(model, generator, False, (0, 2), lambda a, m: 3 <= len(a) <= 5 and a[-1] == EOS),
    ]
    random = torch.randint(3, 60, (6,), generator=generator).tolist()
    answers = [
        random[:3] + [EOS],  # the model ends at once: a miss of 4 tokens
        random[3:] + [EOS],
        [EOS],  # the model goes on: a miss of 1 token
        found[3][2],  # the model's own answer: a hit
        found[4][2],  # truncated away by the model
        found[5][2],
        [found[6][2][0], 3 + (found[6][2][1] - 2) % 56, *found[6][2][2:]],  # a wrong 2nd token
    ]
    return [
        parity_row(i, prompt, answer, image)
        for i, ((prompt, image, _), answer) in enumerate(zip(found, answers))
    ]


def training_rows() -> list[dict]:
    """4 image rows (every training batch runs the vision tower on every process)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(4):
        prompt = [1, -200] + torch.randint(3, 60, (i % 3,), generator=generator).tolist()
        answer = torch.randint(3, 60, (3,), generator=generator).tolist() + [EOS]
        image = torch.rand(1, 1, 8, 8, generator=generator)
        rows.append(
            {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "images": image}
        )
    return rows


def rows_digest(rows: list[dict]) -> list[dict]:
    """What the test compares with the rows it builds itself."""
    return [
        {
            "input_ids": row["input_ids"],
            "labels": row["labels"],
            "task": row.get("task"),
            "images": row["images"].flatten().tolist(),
        }
        for row in rows
    ]


# ---- collectives --------------------------------------------------------------------------------


class Collectives:
    """Counts the calls of ``torch.distributed``'s collectives (outermost calls only).

    Installed before DeepSpeed initialises its communication backend, which keeps references to
    some of these functions (``all_gather_into_tensor``)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._depth = threading.local()
        from torch.distributed import distributed_c10d

        for name in COLLECTIVES:
            function = getattr(distributed_c10d, name, None)
            if function is None:
                continue
            counted = self._counted(name, function)
            setattr(distributed_c10d, name, counted)
            if getattr(torch.distributed, name, None) is function:
                setattr(torch.distributed, name, counted)

    def _counted(self, name: str, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if depth == 0:
                self.counts[name] += 1
            self._depth.value = depth + 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth.value = depth

        return counted

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.counts)

    def since(self, before: collections.Counter) -> dict[str, int]:
        delta = self.counts.copy()
        delta.subtract(before)
        return {name: count for name, count in sorted(delta.items()) if count}


# ---- what each evaluation batch was and did -----------------------------------------------------


class BatchProbe:
    """Hooks recording each top-level evaluation forward of the model (``Trainer``'s call, with
    labels, in eval mode): its rows, the calls of some modules inside it, and its collectives;
    and, from ``on_prediction_step``, the collectives of each whole evaluation step."""

    def __init__(self, model, collectives: Collectives) -> None:
        self.collectives = collectives
        self.batches: list[dict] = []
        self.steps: list[dict] = []
        self.active = False
        self._depth = 0
        self._current: dict | None = None
        self._before = None
        self._step_start = None
        self.handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._leave),
        ]
        counted = {
            "head": model.get_output_embeddings(),
            "vision_tower": model.vision_tower,
            "embed_tokens": model.get_input_embeddings(),
        }
        for name, module in counted.items():
            self.handles.append(module.register_forward_hook(functools.partial(self._call, name)))

    def start(self) -> None:
        """Before ``evaluate()``: the first step's collectives include the loop's setup."""
        self.active = True
        self.batches, self.steps = [], []
        self._step_start = self.collectives.snapshot()

    def stop(self) -> None:
        self.active = False

    def _enter(self, module, args, kwargs) -> None:
        if not self.active:
            return
        self._depth += 1
        if self._depth > 1:
            if self._current is not None:
                if not self._current["root_calls"]:  # the split, the head, the prompts' embeddings
                    self._current["before_decoding"] = self.collectives.since(self._before)
                self._current["root_calls"] += 1
            return
        if module.training or "labels" not in kwargs:
            return
        labels = kwargs["labels"]
        self._current = {
            "input_ids": kwargs["input_ids"].tolist(),
            "labels": labels.tolist(),
            "attention_mask": kwargs["attention_mask"].tolist(),
            "zero_images": [bool((image == 0).all()) for image in kwargs["images"]],
            "head": 0,
            "vision_tower": 0,
            "embed_tokens": 0,
            "root_calls": 0,
        }
        self._before = self.collectives.snapshot()

    def _leave(self, module, args, output) -> None:
        if not self.active:
            return
        self._depth -= 1
        if self._depth == 0 and self._current is not None:
            self._current["forward_collectives"] = self.collectives.since(self._before)
            self.batches.append(self._current)
            self._current = None

    def _call(self, name: str, module, args, output) -> None:
        if self.active and self._current is not None:
            self._current[name] += 1

    def on_prediction_step(self) -> None:
        if self.active:
            self.steps.append(self.collectives.since(self._step_start))
            self._step_start = self.collectives.snapshot()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _callback(probe: BatchProbe):
    from transformers import TrainerCallback

    class StepCollectives(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            probe.on_prediction_step()

    return StepCollectives()


# ---- one stage ----------------------------------------------------------------------------------


def _full_weights(model, stage: int) -> dict[str, torch.Tensor]:
    """Every rank's copy of the whole trained weights: under ZeRO-3 gathered from the
    partitions (a collective: every rank enters it)."""
    if stage != 3:
        return {key: value.detach().clone() for key, value in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _partitioned(model) -> dict:
    """How DeepSpeed holds the parameters here: ZeRO-3 leaves each rank an empty placeholder."""
    return {
        name: {"ds_id": hasattr(p, "ds_id"), "local_numel": p.numel()}
        for name, p in model.named_parameters()
        if name in ("lm_head.weight", "vision_tower.weight", "model.embed_tokens.weight")
    }


def run_stage(stage: int, rows, out: Path, rank: int, collectives: Collectives, tmp: str) -> dict:
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from mllm_metrics.forward import is_sharded
    from mllm_metrics.hf import expose_processed_labels

    AcceleratorState._reset_state()  # a second Trainer with another DeepSpeed config
    model = deepspeed_model()
    probe = BatchProbe(model, collectives)
    streaming = parity_streaming(out / "records" / f"zero{stage}" / f"rank{rank}")
    handle = expose_processed_labels(model, logits_chunk_size=CHUNK, metrics=streaming)
    arguments = TrainingArguments(
        output_dir=os.path.join(tmp, f"zero{stage}"),
        use_cpu=True,
        deepspeed=deepspeed_config(stage),
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        max_steps=MAX_STEPS,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        batch_eval_metrics=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=training_rows(),
        eval_dataset=rows,
        data_collator=parity_collate,
        compute_metrics=streaming,
        preprocess_logits_for_metrics=streaming.preprocess_logits,
        callbacks=[_callback(probe)],
    )
    trainer.train()
    probe.start()
    evaluation = trainer.evaluate()
    probe.stop()
    exposed = {"batches": probe.batches, "steps": probe.steps}
    result = {
        "evaluation": evaluation,
        "probe": exposed,
        "zero_stage": trainer.deepspeed.zero_optimization_stage(),
        "engine": type(trainer.model_wrapped).__name__,
        "is_sharded": is_sharded(model),
        "partitioned": _partitioned(model),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "global_step": trainer.state.global_step,
    }
    weights = _full_weights(model, stage)
    torch.save(weights, out / f"trained_zero{stage}_rank{rank}.pt")
    # The same batches without the library: the model's own forward, and (without
    # compute_metrics) Trainer gathers its loss only; the rows without the group column, which
    # Trainer's signature columns, cached while the model was exposed, would let through.
    handle.remove()
    trainer.compute_metrics = None
    trainer.preprocess_logits_for_metrics = None
    probe.start()
    untasked = [{key: value for key, value in row.items() if key != "task"} for row in rows]
    plain = trainer.evaluate(untasked, metric_key_prefix="plain")
    probe.stop()
    result["plain"] = {
        "evaluation": plain,
        "probe": {"batches": probe.batches, "steps": probe.steps},
    }
    probe.remove()
    del trainer, model
    gc.collect()
    return result


def _main(out_dir: str) -> None:
    torch.set_num_threads(1)
    from mllm_metrics import MllmMetricsWarning

    warnings.simplefilter("error", MllmMetricsWarning)  # as in the test suite
    collectives = Collectives()  # before DeepSpeed sets up its communication
    import deepspeed

    deepspeed.init_distributed("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    model = deepspeed_model()
    rows = deepspeed_rows(model)
    if rank == 0:
        torch.save(model.state_dict(), out / "initial.pt")
    results: dict = {"rows": rows_digest(rows), "training_rows": rows_digest(training_rows())}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            results[f"zero{stage}"] = run_stage(stage, rows, out, rank, collectives, tmp)
    results["world_size"] = torch.distributed.get_world_size()
    results["backend"] = torch.distributed.get_backend()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _main(sys.argv[1])
