"""`python -m bench` / `make bench`: the benchmark suite (for now: the fused token statistics)."""

import sys

from .token_stats_cpu import main

sys.exit(main(sys.argv[1:]))
