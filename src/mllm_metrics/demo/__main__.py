"""``python -m mllm_metrics.demo``: the same as ``mllm-metrics demo``."""

import sys

from mllm_metrics.demo.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
