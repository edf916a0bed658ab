"""TRL integration tests: run in TRL's venv (`make test-trl`: .venv-trl joins the main venv's packages and adds
TRL 1.16). The Triton interpreter is off: TRL's own fused head (the reference here) runs its PyTorch path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
