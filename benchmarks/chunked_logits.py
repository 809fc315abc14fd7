"""Peak memory and time of one validation step with a Llama-3-sized vocabulary, by chunk size.

    python benchmarks/chunked_logits.py

V = 128256, L = 1024, B = 2, a tiny hidden size: the step's memory is dominated by the
(B, L, V) logits (1 GiB in float32) unless ``MultimodalLMModule(logits_chunk_size=N)`` applies
the output head N positions at a time. Each chunk size runs in its own process; the peak is
the growth of the process's peak resident memory during the step, the time the median of 3.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from _common import header, peak_rss_mib, run_child, table

VOCAB, LENGTH, BATCH = 128256, 1024, 2
CHUNKS = ["none", "1024", "256", "64"]


def child(chunk: str) -> None:
    import lightning.pytorch  # noqa: F401  (imported before measuring)
    import transformers

    from mllm_metrics.lightning import MultimodalLMModule

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    module = MultimodalLMModule(model, logits_chunk_size=None if chunk == "none" else int(chunk))
    module.log = lambda *args, **kwargs: None  # one bare step, no Trainer around it
    module.log_dict = lambda *args, **kwargs: None
    input_ids = torch.randint(VOCAB, (BATCH, LENGTH))
    labels = input_ids.clone()
    labels[:, : LENGTH // 2] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    seconds, growth = [], []
    with torch.no_grad():
        for _ in range(3):
            before = peak_rss_mib()
            start = time.perf_counter()
            module.validation_step(batch, 0)
            seconds.append(time.perf_counter() - start)
            growth.append(peak_rss_mib() - before)
    print(json.dumps({"seconds": statistics.median(seconds), "peak_growth_mib": max(growth)}))


def main() -> None:
    results = {chunk: run_child(__file__, chunk) for chunk in CHUNKS}
    full = results["none"]
    rows = [
        [
            chunk,
            f"{result['peak_growth_mib']:.0f}",
            f"{full['peak_growth_mib'] / max(result['peak_growth_mib'], 1):.1f}×",
            f"{result['seconds'] * 1e3:.0f}",
            f"{result['seconds'] / full['seconds']:.2f}×",
        ]
        for chunk, result in results.items()
    ]
    print(header(f"Chunked logits: one validation step, V={VOCAB}, L={LENGTH}, B={BATCH}"))
    print(
        table(
            [
                "logits_chunk_size",
                "peak step memory (MiB)",
                "lower than unchunked",
                "step time (ms)",
                "time vs unchunked",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
