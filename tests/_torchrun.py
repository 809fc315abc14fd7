"""Run a test job on 2 CPU processes with torchrun (gloo) and read what each rank wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_on_two_processes(
    script: str, out_dir: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> list[dict]:
    """``torchrun --standalone --nproc_per_node 2 tests/SCRIPT OUT_DIR``; each rank writes
    ``OUT_DIR/rank<r>.json``, returned in rank order. The run must succeed within ``timeout``
    seconds: torchrun then gets SIGTERM, which it passes on to the workers (they run in sessions
    of their own: killing torchrun alone would leave them running), then SIGKILL."""
    path = [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    environment |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(TESTS / script), str(out_dir)]
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        raise AssertionError(f"{script} did not end in {timeout} s:\n{output[-6000:]}") from None
    assert process.returncode == 0, output[-8000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
