"""The supervised-only chunked head on models sharded with FSDP2 (``fully_shard``), 2 CPU processes.

Run as ``torchrun --standalone --nproc_per_node 2 fsdp_job.py OUT_DIR``; used by test_fsdp.py.
Each decoder layer, then the root model, is sharded with ``fully_shard`` (gloo, CPU). Every rank
feeds the *same* batches (FSDP shards the parameters, not the data), so each rank's results must
equal those of the unsharded model, computed in the same process before sharding. Models: the
LLaVA-style demo model, a Llama, and a Llama whose output head is an FSDP module of its own.
Per model it records, for the unsharded reference and for the sharded model:

- ``split``: ``aligned_hidden_states`` + ``supervised_head_predictions`` per batch (what the
  Lightning module and the Trainer path run): ids, shifted labels and row NLL;
- ``trainer``: what ``Trainer.prediction_step`` does with ``batch_eval_metrics`` under
  ``expose_processed_labels(model, logits_chunk_size=3)``: the model called in eval mode with
  labels, its outputs through ``StreamingMetrics.preprocess_logits`` and ``StreamingMetrics``;
  the raw metric states, the results and the summed loss.

Then ``lightning``: ``Trainer.validate`` of ``MultimodalLMModule`` under Lightning's
``ModelParallelStrategy`` (FSDP2 applied in ``configure_model``, data split by the
``DistributedSampler`` as in real use): its synced metric states and logged values.

Then generation, the same way (``generate_max_new_tokens=GEN_TOKENS``, ``eos_token_id=EOS``,
per-sample records with a tokenizer that spells ids): ``generation_llava_style`` (the demo
model, decoded by the library's cached loop) and ``generation_hf_llava`` (Hugging Face's
``LlavaForConditionalGeneration``, decoded by its own ``generate``). Both favour the end token,
so rows stop at different steps and the two ranks' batches would stop at different steps if
nothing kept them in step. Per model: each row's greedy answer from a batch-size-1 loop that
recomputes the whole forward at every step (on the unsharded model, before sharding), the
logged values, the records, and per batch the data-set rows it held and the number of root
forwards (``model(...)`` calls, counted by a forward hook) its validation step made.
Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

CHUNK = 3
# Generation: the end token, and `generate_max_new_tokens` (as in the issue).
EOS = 2
GEN_TOKENS = 8
# A rank left waiting in a collective (processes out of step) fails after this, instead of
# hanging for gloo's default 30 minutes; the whole job takes well under a minute.
COLLECTIVE_TIMEOUT = timedelta(seconds=100)


def shard(model: torch.nn.Module, mesh=None, head_unit: bool = False) -> torch.nn.Module:
    """FSDP2 as its docs apply it: each decoder layer, then the root (embeddings, head...);
    with ``head_unit``, the output head is an FSDP module of its own as well."""
    for layer in model.get_decoder().layers:  # the language model's decoder layers
        fully_shard(layer, mesh=mesh)
    if head_unit:
        fully_shard(model.get_output_embeddings(), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sharded(model: torch.nn.Module) -> bool:
    """Whether no gathered parameter is left: every parameter is a shard (a DTensor)."""
    return all(isinstance(p, DTensor) for p in model.parameters())


def split_predictions(model, batches) -> list[dict]:
    from mllm_metrics.chunked import supervised_head_predictions
    from mllm_metrics.labels import aligned_hidden_states

    results = []
    with torch.no_grad():
        for batch in batches:
            split = aligned_hidden_states(model, batch)
            chunked = supervised_head_predictions(
                split.hidden_states, split.output_head, split.labels, CHUNK
            )
            results.append(
                {
                    "preds": chunked.preds.tolist(),
                    "target": chunked.target.tolist(),
                    "row_nll": chunked.row_nll.tolist(),
                }
            )
    return results


def trainer_style(model, batches) -> dict:
    """``Trainer.prediction_step`` + ``batch_eval_metrics``, by hand, on this process only."""
    from _hf_setup import counting_metrics
    from transformers import EvalPrediction
    from transformers.trainer_pt_utils import nested_detach

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    streaming = StreamingMetrics(counting_metrics())
    loss = 0.0
    with expose_processed_labels(model, logits_chunk_size=CHUNK):
        ignore_keys = getattr(model.config, "keys_to_ignore_at_inference", None) or []
        for batch in batches:
            with torch.no_grad():
                outputs = model(**batch)
            loss += float(outputs["loss"])
            # As Trainer.prediction_step: every field but the loss, detached; one field alone.
            logits = nested_detach(
                tuple(v for k, v in outputs.items() if k not in [*ignore_keys, "loss"])
            )
            logits = logits[0] if len(logits) == 1 else logits
            preprocessed = streaming.preprocess_logits(logits, batch["labels"])
            prediction = EvalPrediction(predictions=preprocessed, label_ids=batch["labels"])
            streaming(prediction, compute_result=False)
    states = {
        name: value.item()
        for metric in streaming.metrics.values(copy_state=False)
        for name, value in metric.metric_state.items()
    }
    return {"states": states, "results": streaming.compute(), "loss": loss}


def run_model(model, batches, head_unit: bool = False) -> dict:
    """The unsharded reference, then the same calls on the sharded model."""
    reference = copy.deepcopy(model)
    result = {
        "reference": {
            "split": split_predictions(reference, batches),
            "trainer": trainer_style(reference, batches),
        }
    }
    shard(model, head_unit=head_unit)
    sharded_before = all_sharded(model)
    # The split first, on a model whose root never ran forward (FSDP's lazy init not done).
    split = split_predictions(model, batches)
    result["sharded"] = {
        "all_sharded_before": sharded_before,
        "split": split,
        "all_sharded_after_split": all_sharded(model),
        "trainer": trainer_style(model, batches),
        # Once more, after root forwards (whose default leaves the root's parameters gathered).
        "split_after_forwards": split_predictions(model, batches),
    }
    return result


def sharded_module(model, **arguments):
    """``MultimodalLMModule`` whose ``configure_model`` applies FSDP2 (:func:`shard`) on the
    data-parallel mesh of Lightning's ``ModelParallelStrategy``."""
    from mllm_metrics.lightning import MultimodalLMModule

    class ShardedModule(MultimodalLMModule):
        def configure_model(self) -> None:
            if not isinstance(self.model, FSDPModule):
                shard(self.model, self.device_mesh["data_parallel"])

    return ShardedModule(model, **arguments)


def model_parallel_trainer(*callbacks):
    """A Trainer with FSDP2 over the 2 processes: ``ModelParallelStrategy``, no tensor parallel."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def lightning_validate(rows, collate) -> dict:
    import lightning.pytorch as pl
    import torchmetrics
    from _hf_setup import tiny_llava
    from torch.utils.data import DataLoader

    class RecordSyncedStates(pl.Callback):
        def __init__(self) -> None:
            self.states: dict[str, float] = {}

        def on_validation_epoch_end(self, trainer, module) -> None:
            for key, group in module.evaluations.items():
                for metric in group.modules():
                    if isinstance(metric, torchmetrics.Metric) and metric._defaults:
                        with metric.sync_context(should_sync=True):
                            for name, value in metric.metric_state.items():
                                self.states[f"{key}/{name}"] = value.item()

    recorder = RecordSyncedStates()
    trainer = model_parallel_trainer(recorder)
    module = sharded_module(tiny_llava(), logits_chunk_size=CHUNK)
    loader = DataLoader(rows, batch_size=2, collate_fn=collate)
    [logged] = trainer.validate(module, loader, verbose=False)
    return {"states": recorder.states, "logged": logged, "all_sharded": all_sharded(module.model)}


# ---- generation ----------------------------------------------------------------------------


@torch.no_grad()
def greedy_reference(next_logits, prompt: list[int]) -> list[int]:
    """Greedy decoding of one row, the whole forward recomputed at every step, no cache: up to
    and including the end token, or ``GEN_TOKENS`` tokens."""
    answer: list[int] = []
    for _ in range(GEN_TOKENS):
        answer.append(int(next_logits(prompt + answer).argmax()))
        if answer[-1] == EOS:
            break
    return answer


def dataset_answer(greedy: list[int], row: int) -> list[int]:
    """The data set's answer to a row whose greedy answer is ``greedy``, always ending with the
    end token: ``greedy`` itself (a hit); for every third row, its first token changed (a miss);
    for a greedy answer that does not end within ``GEN_TOKENS``, its first tokens then the end
    token (a miss, with partial bit-match credit)."""
    if greedy[-1] != EOS:
        return greedy[:-1] + [EOS]
    if row % 3 == 1:
        wrong = 3 + (greedy[0] - 2) % 58  # another token in [3, 60]: not EOS, not an image
        return [wrong, *greedy[1:]] if len(greedy) > 1 else [wrong, EOS]
    return greedy


def generation_llava_style() -> tuple[torch.nn.Module, list[dict], list[list[int]]]:
    """The LLaVA-style demo model with the end token favoured; 8 rows of one image and a prompt
    of 0 to 3 more tokens; each row's greedy answer. Seed and bias chosen so that rows end at
    steps 1 to 5 or run to ``GEN_TOKENS``, and under a 2-process ``DistributedSampler`` with
    batches of 2 the ranks' batches end at different steps."""
    from _reference import favour_token

    from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch, tiny_llava_config

    torch.manual_seed(0)
    model = favour_token(TinyLlavaForCausalLM(tiny_llava_config()), token=EOS, bias=0.2).eval()
    generator = torch.Generator().manual_seed(8)
    rows, greedy = [], []
    for i in range(8):
        image = torch.rand(1, 1, 8, 8, generator=generator)
        prompt = [1, -200] + torch.randint(3, 64, (i % 4,), generator=generator).tolist()

        def next_logits(ids, image=image):
            return model(**make_multimodal_batch([ids], [[]], image)).logits[0, -1]

        greedy.append(greedy_reference(next_logits, prompt))
        rows.append({"prompt": prompt, "answer": dataset_answer(greedy[-1], i), "image": image})
    return model, rows, greedy


def generation_hf_llava() -> tuple[torch.nn.Module, list[dict], list[list[int]]]:
    """A tiny ``LlavaForConditionalGeneration`` with the end token favoured and the image token
    never predicted (the reference reruns whole sequences, where an image token needs an
    image); 8 rows of 4 image tokens and 0 to 2 text tokens; each row's greedy answer."""
    from _models import LLAVA_IMAGE_TOKEN, tiny_hf_llava
    from _reference import favour_token

    model = favour_token(tiny_hf_llava(), token=EOS, bias=0.25).eval()
    with torch.no_grad():
        model.get_output_embeddings().bias[LLAVA_IMAGE_TOKEN] = -10.0
    generator = torch.Generator().manual_seed(5)
    rows, greedy = [], []
    for i in range(8):
        pixels = torch.rand(3, 8, 8, generator=generator)
        text = torch.randint(3, 60, (i % 3,), generator=generator).tolist()
        prompt = [1] + [LLAVA_IMAGE_TOKEN] * 4 + text

        def next_logits(ids, pixels=pixels):
            return model(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits[0, -1]

        greedy.append(greedy_reference(next_logits, prompt))
        answer = dataset_answer(greedy[-1], i)
        rows.append(
            {
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
                "pixel_values": pixels,
            }
        )
    return model, rows, greedy


def row_pixel(image: torch.Tensor) -> float:
    """The first pixel of a row's image: every row has one image of random pixels, so this
    identifies the row in a batch (rows of the same text differ by their image)."""
    return float(image.flatten()[0])


def row_answer(row: dict) -> list[int]:
    """A row's answer: its supervised tokens."""
    if "answer" in row:
        return row["answer"]
    return [label for label in row["labels"] if label != -100]


def count_root_forwards(rows: list[dict]):
    """A callback counting the calls of the (root) model in each validation step, with the
    data-set rows of each batch."""
    import lightning.pytorch as pl

    index_of = {
        row_pixel(row.get("image", row.get("pixel_values"))): i for i, row in enumerate(rows)
    }
    assert len(index_of) == len(rows), "rows must differ to be recognised in a batch"

    class CountRootForwards(pl.Callback):
        def __init__(self) -> None:
            self.calls = 0
            self.forwards: list[int] = []
            self.batches: list[list[int]] = []

        def _count(self, module, args, outputs) -> None:
            self.calls += 1

        def on_validation_start(self, trainer, module) -> None:
            self.hook = module.model.register_forward_hook(self._count)

        def on_validation_end(self, trainer, module) -> None:
            self.hook.remove()

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, *args) -> None:
            self.start = self.calls
            images = batch.get("images", batch.get("pixel_values"))  # one per row, in order
            self.batches.append([index_of[row_pixel(image)] for image in images])

        def on_validation_batch_end(self, trainer, module, *args) -> None:
            self.forwards.append(self.calls - self.start)

    return CountRootForwards()


def lightning_generate(model, rows, collate, greedy, records_dir: Path) -> dict:
    """``Trainer.validate`` with generation under ``ModelParallelStrategy`` (FSDP2 in
    ``configure_model``): logged values, records, and each batch's rows and root forwards."""
    from _hf_setup import SpellTokenizer
    from torch.utils.data import DataLoader

    counter = count_root_forwards(rows)
    trainer = model_parallel_trainer(counter)
    module = sharded_module(
        model,
        logits_chunk_size=CHUNK,
        tokenizer=SpellTokenizer(),
        records_dir=records_dir,
        generate_max_new_tokens=GEN_TOKENS,
        eos_token_id=EOS,
    )
    loader = DataLoader(rows, batch_size=2, collate_fn=collate)
    [logged] = trainer.validate(module, loader, verbose=False)
    dist.barrier()  # process 0 has written the records
    lines = (records_dir / "val_step0000000.jsonl").read_text().splitlines()
    return {
        "greedy": greedy,
        "answers": [row_answer(row) for row in rows],
        "logged": logged,
        "records": [json.loads(line) for line in lines],
        "forwards": counter.forwards,
        "batches": counter.batches,
        "fsdp_root": isinstance(module.model, FSDPModule),
    }


def guarded(function, *args) -> dict:
    """``function(*args)`` with ``error`` None, or only the formatted error it raised: a failing
    generation fails its own tests, not every test of the job."""
    try:
        return {"error": None, **function(*args)}
    except Exception:
        return {"error": traceback.format_exc()}


def generate_with(build, collate, records_dir: Path) -> dict:
    model, rows, greedy = build()
    return lightning_generate(model, rows, collate, greedy, records_dir)


def generation(out_dir: Path) -> dict:
    from _hf_setup import collate_hf_llava, collate_llava_style
    from _models import hf_llava_expands_inside

    results = {
        "generation_llava_style": guarded(
            generate_with, generation_llava_style, collate_llava_style, out_dir / "records_llava"
        ),
        "generation_hf_llava": None,
    }
    if not hf_llava_expands_inside():  # transformers 4.37's Llava: tested on 5.x only
        results["generation_hf_llava"] = guarded(
            generate_with, generation_hf_llava, collate_hf_llava, out_dir / "records_hf_llava"
        )
    return results


def llama_batches() -> list[dict]:
    from mllm_metrics.demo import make_multimodal_batch

    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        prompts = [torch.randint(3, 16, (int(n),), generator=generator).tolist() for n in (2, 4, 3)]
        answers = [
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        batches.append(make_multimodal_batch(prompts, answers))
    return batches


def main(out_dir: Path) -> None:
    start = time.perf_counter()
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)
    from _hf_setup import collate_llava_style, ddp_eval_set, llava_style_reference
    from _models import tiny_llama
    from _reference import favour_token

    llava, rows = ddp_eval_set()
    llava_batches = [collate_llava_style(rows[i : i + 2]) for i in range(0, len(rows), 2)]
    results = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "llava_brute_force": llava_style_reference(llava, rows, batch_size=2),
        # The LLaVA-style demo model (no head bias) and a Llama whose head has a bias.
        "llava": run_model(llava, llava_batches),
        "llama": run_model(favour_token(tiny_llama(), bias=0.5), llama_batches()),
        "llama_head_unit": run_model(
            favour_token(tiny_llama(), bias=0.5), llama_batches(), head_unit=True
        ),
    }
    results["lightning"] = lightning_validate(rows, collate_llava_style)
    results |= generation(out_dir)
    results["seconds"] = time.perf_counter() - start
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
