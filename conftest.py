"""Test-run settings shared by the tests and the doctests of ``src/``."""

import os

# DeepSpeed (in the dev extra, for the ZeRO tests) logs "Setting accelerator to CPU" on import
# when it finds no GPU, into the output of every Trainer run; it runs on the CPU here anyway.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The tests' models are tiny: one thread each is the fastest, and the processes the tests start
# (torchrun jobs, the demo) inherit it, so 2 processes on 2 shared cores do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which OpenMP reads when torch loads)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_report_header() -> str:
    return f"torch threads: {torch.get_num_threads()} (tiny models; set OMP_NUM_THREADS to change)"
