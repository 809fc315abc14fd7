"""Peak memory of a full evaluation as the eval set grows: stock Trainer vs streaming metrics.

    python benchmarks/eval_scaling.py

A tiny Llama with V = 8192; batches of B = 8 rows of L = 128 tokens; N = 64, 256, 1024 samples.
(a) stock ``transformers.Trainer`` with a plain ``compute_metrics`` that receives the logits,
(b) ``Trainer`` + ``StreamingMetrics`` (``batch_eval_metrics=True``),
(c) ``MultimodalLMModule`` in Lightning's ``trainer.validate``.
Each configuration runs in its own process; the figure is that process's peak resident memory.
(L is 128, not 256, so that (a) at N = 1024 keeps its 4 GiB of logits, twice over while
concatenating, inside this 24 GiB machine.)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from _common import header, peak_rss_mib, run_child, table

VOCAB, LENGTH, BATCH = 8192, 128, 8
SIZES = [64, 256, 1024]
CONFIGS = {
    "a": "stock Trainer, compute_metrics on logits",
    "b": "Trainer + StreamingMetrics",
    "c": "MultimodalLMModule, trainer.validate",
}


class Samples(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(VOCAB, (count, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        labels = self.input_ids[index].clone()
        labels[: LENGTH // 2] = -100
        return {"input_ids": self.input_ids[index], "labels": labels}


def model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return transformers.LlamaForCausalLM(config).eval()


def stock_compute_metrics(eval_pred) -> dict:

    preds = eval_pred.predictions[:, :-1].argmax(-1)
    target = eval_pred.label_ids[:, 1:]
    supervised = target != -100
    return {"bit_match": float((preds == target)[supervised].mean())}


def child(config: str, size: int) -> None:
    import lightning.pytorch as pl
    import transformers

    from mllm_metrics.hf import StreamingMetrics
    from mllm_metrics.lightning import MultimodalLMModule

    dataset, start = Samples(size), time.perf_counter()
    if config == "c":
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        [results] = trainer.validate(MultimodalLMModule(model()), loader, verbose=False)
        value = results["val/bit_match"]
    else:
        streaming = StreamingMetrics()
        with tempfile.TemporaryDirectory() as out:
            arguments = dict(
                output_dir=out,
                per_device_eval_batch_size=BATCH,
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
            )
            extra = {}
            if config == "b":
                arguments["batch_eval_metrics"] = True
                extra = dict(
                    compute_metrics=streaming,
                    preprocess_logits_for_metrics=streaming.preprocess_logits,
                )
            else:
                extra = dict(compute_metrics=stock_compute_metrics)
            trainer = transformers.Trainer(
                model=model(),
                args=transformers.TrainingArguments(**arguments),
                eval_dataset=dataset,
                **extra,
            )
            value = trainer.evaluate()["eval_bit_match"]
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mib": peak_rss_mib(), "seconds": seconds, "bit_match": value}))


def main() -> None:
    results = {(c, n): run_child(__file__, c, str(n)) for c in CONFIGS for n in SIZES}
    rows = []
    for config, name in CONFIGS.items():
        peaks = [results[(config, n)]["peak_mib"] for n in SIZES]
        seconds = results[(config, SIZES[-1])]["seconds"]
        rows.append(
            [
                name,
                *(f"{peak:.0f}" for peak in peaks),
                f"{peaks[-1] / peaks[0]:.2f}×",
                f"{seconds:.1f}",
            ]
        )
    values = {n: {c: results[(c, n)]["bit_match"] for c in CONFIGS} for n in SIZES}
    print(header(f"Eval-set scaling: peak RSS (MiB), B={BATCH}, L={LENGTH}, V={VOCAB}"))
    print(
        table(
            [
                "configuration",
                *(f"N={n}" for n in SIZES),
                f"N={SIZES[-1]} / N={SIZES[0]}",
                f"seconds at N={SIZES[-1]}",
            ],
            rows,
        )
    )
    print(f"bit-match reported (all three must agree): {json.dumps(values)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
