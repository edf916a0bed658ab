"""The `vlmfast` command."""

from __future__ import annotations

import sys

USAGE = """usage: vlmfast <command> [args]

commands:
  demo              the main job: the warm-start study on the synthetic task (runs/tiny_study/report.md)
  study             the same, any study recipe: vlmfast study --config recipes/X.yaml [key=value ...]
  train             run a recipe: vlmfast train --config recipes/X.yaml [key=value ...]
  plan              per-GPU memory of a recipe by component: vlmfast plan --config X [--gpus 8 --gpu-memory 80GiB]
  quickstart        a one-minute tiny transformer trained with the fused loss (runs/quickstart)
  inspect-kernels   compile the Triton kernels for sm_90/sm_80 and report registers, spills, smem
  version           print the version
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("demo", "study"):
        from .study import main as study_main

        return study_main(rest)
    if cmd == "quickstart":
        from .quickstart import main as quickstart_main

        return quickstart_main(rest)
    if cmd == "train":
        from .train import main as train_main

        return train_main(rest)
    if cmd == "plan":
        from .plan import main as plan_main

        return plan_main(rest)
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
