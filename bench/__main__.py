"""`python -m bench` (`make bench`): the benchmark suite, see bench/suite.py."""

import sys

from .suite import main

sys.exit(main(sys.argv[1:]))
