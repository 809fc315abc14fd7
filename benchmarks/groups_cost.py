"""The cost of per-group values as the number of groups grows: time of a validation and the
number of values logged.

    python benchmarks/groups_cost.py

``lightning.Trainer.validate`` of ``MultimodalLMModule(model, group_key="task", groups=G names)``
on the demo's tiny LLaVA-style model (``TinyLlavaForCausalLM`` from ``tiny_llava_config()``,
untrained), 40 batches of 8 rows (one image, a 4-token prompt and a 6-token answer each), each
row tagged with one of the G groups, for G = 0 (no groups), 10, 100, 1,000. Each configuration
runs in its own process: one warm-up validation, then ``REPEATS`` timed ones (median and
range), one torch thread. "values logged" is what the validation leaves in
``trainer.logged_metrics``; "self.log calls" counts the module's calls of ``self.log`` during one
validation (Lightning's cost grows with them).

Set ``PYTHONPATH`` to another checkout's ``src`` to measure another version of the library.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _common import header, run_child, table

GROUP_COUNTS = [0, 10, 100, 1000]
BATCHES, ROWS, REPEATS = 40, 8, 3


def _child(groups: int) -> dict:
    import json
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    import mllm_metrics
    from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch, tiny_llava_config
    from mllm_metrics.lightning import MultimodalLMModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLlavaForCausalLM(tiny_llava_config()).eval()
    names = [f"group{i:04d}" for i in range(groups)]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for batch_index in range(BATCHES):
        prompts = [[1, -200, *torch.randint(3, 60, (3,), generator=generator).tolist()]] * ROWS
        answers = [torch.randint(3, 60, (5,), generator=generator).tolist() + [2]] * ROWS
        images = torch.rand(ROWS, 1, 8, 8, generator=generator)
        batch = make_multimodal_batch(prompts, answers, images)
        if groups:
            batch["task"] = [names[(batch_index * ROWS + row) % groups] for row in range(ROWS)]
        batches.append(batch)
    loader = DataLoader(batches, batch_size=None)
    options = {"group_key": "task", "groups": names} if groups else {}
    module = MultimodalLMModule(model, **options)
    calls = [0]
    log = module.log

    def counting_log(*args, **kwargs):
        calls[0] += 1
        return log(*args, **kwargs)

    module.log = counting_log
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, loader, verbose=False)  # warm-up
    times = []
    for _ in range(REPEATS):
        calls[0] = 0
        start = time.perf_counter()
        trainer.validate(module, loader, verbose=False)
        times.append(time.perf_counter() - start)
    result = {
        "seconds": times,
        "logged": len(trainer.logged_metrics),
        "log_calls": calls[0],
        "version": getattr(mllm_metrics, "__file__", ""),
    }
    print(json.dumps(result))
    return result


def main() -> None:
    rows = []
    for groups in GROUP_COUNTS:
        result = run_child(__file__, str(groups))
        seconds = result["seconds"]
        rows.append(
            [
                groups or "no groups",
                f"{statistics.median(seconds):.2f}",
                f"{min(seconds):.2f}–{max(seconds):.2f}",
                result["logged"],
                result["log_calls"],
            ]
        )
    print(header("Per-group values: one validation (40 batches of 8 rows) by number of groups"))
    print(f"library: {result['version']}\n")
    columns = ["groups", "seconds (median)", "range", "values logged", "self.log calls"]
    print(table(columns, rows))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]))
    else:
        main()
