"""Test-run settings shared by the tests and the doctests of ``src/``."""

import os

# DeepSpeed (in the dev extra, for the ZeRO tests) logs "Setting accelerator to CPU" on import
# when it finds no GPU, into the output of every Trainer run; it runs on the CPU here anyway.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
