"""`python -m bench [token_stats|losses ...]` (`make bench`): the CPU benchmark suite, every
comparison side by side in one run. With no argument, runs all (about 15 minutes on 2 cores).
Each script also runs alone: `python -m bench.token_stats_cpu --help`, `python -m bench.losses_cpu --help`."""

import sys

from . import losses_cpu, token_stats_cpu

SUITES = {"token_stats": lambda: token_stats_cpu.main(["--repeats", "2"]), "losses": lambda: losses_cpu.main([])}


def main(argv) -> int:
    names = argv or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name} ==", flush=True)
        rc = SUITES[name]()
        if rc:
            return rc
    return 0


sys.exit(main(sys.argv[1:]))
