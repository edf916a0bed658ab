"""The `vlmfast` command."""

from __future__ import annotations

import sys

USAGE = """usage: vlmfast <command> [args]

commands:
  demo              the main job: train a tiny model end to end with the fused loss (runs/demo)
  train             run a recipe: vlmfast train --config recipes/X.yaml [key=value ...]
  inspect-kernels   compile the Triton kernels for sm_90/sm_80 and report registers, spills, smem
  version           print the version
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "train":
        from .train import main as train_main

        return train_main(rest)
    if cmd == "inspect-kernels":
        from .kernels.inspect import main as inspect_main

        return inspect_main(rest)
    if cmd == "version":
        from . import __version__

        print(__version__)
        return 0
    print(f"vlmfast: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
