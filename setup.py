"""vlmfast: fast, instrumented post-training for vision-language models.

The Triton kernels live in `vlmfast/kernels/` (the subpackage `vlmfast.kernels`); the native C++ sources that CMake
builds live in the top-level `kernels/cpu/`. That folder has no `__init__.py` and is never installed: a folder without
one is only a namespace portion, and Python returns a regular package of the same name found anywhere on sys.path
before it, so Hugging Face's `kernels` (which transformers >= 5.25 imports) is never shadowed, even from the repo root
(`python -m ...` from a clone). tests/test_packaging.py holds both.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"

# Bounds are the versions measured to work together (see ../shared/PLATFORM.md and docs/platform.md);
# the upper bounds stop at the next major release, where these APIs are known to move.
INSTALL_REQUIRES = [
    # the newest API the code calls decides it (vlmfast.TORCH_APIS: addmm(out_dtype=, out=), torch 2.10)
    "torch>=2.10",
    "torchvision>=0.21",
    "triton>=3.4; platform_system == 'Linux'",  # tl.make_tensor_descriptor (the sm_90 kernels)
    "transformers>=5.0,<6",
    "accelerate>=1.0,<2",
    "deepspeed>=0.17,<0.21",
    "peft>=0.22,<1",  # model.lora (inject_adapter_in_model, LoraLayer.enable_adapters)
    "liger-kernel>=0.8,<0.9",
    "packaging>=23",  # liger-kernel imports it without declaring it
    "numpy>=1.26,<3",
    "pillow>=10",
    "pyyaml>=6",
    "safetensors>=0.4",
    "math-verify>=0.8,<1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "psutil>=5.9",
    "pyarrow>=14",  # parquet datasets
    "tokenizers>=0.20",  # the tiny models train their tokenizer locally
    "tensorboard>=2.15",  # run directories carry TensorBoard events
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-benchmark>=4",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "datasets>=3",  # hub / save_to_disk datasets (tested on local saves)
        "submitit>=1.5",  # study.executor: slurm (tested through submitit's local executor)
        "bitsandbytes>=0.50,<1",  # model.lora.load_in_4bit (QLoRA), tested on the CPU (its CPU backend)
    ],
    "qlora": ["bitsandbytes>=0.50,<1"],  # model.lora.load_in_4bit
    # Never installed on CPU set-ups: flash-attn builds only against CUDA.
    "gpu": ["flash-attn>=2.7", "vllm>=0.10", "datasets>=3"],  # datasets: hub names such as hiyouga/geometry3k
}

class CMakeExtension(Extension):
    """vlmfast._C: built by CMakeLists.txt, not by setuptools' compiler driver."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Run CMake for the native CPU kernels when a C++ compiler and CMake are here; otherwise (or if
    the build fails) install without them: vlmfast then runs its pure-PyTorch path and says so once
    at import. VLMFAST_REQUIRE_NATIVE=1 turns a missing or failed build into an error;
    VLMFAST_BUILD_NATIVE=0 skips it (the vLLM venv, whose torch differs, shares this source tree)."""

    def run(self):
        reason = self._cannot_build()
        if reason is None:
            try:
                return super().run()
            except subprocess.CalledProcessError as e:
                reason = f"the CMake build failed ({e})"
        if os.environ.get("VLMFAST_REQUIRE_NATIVE") == "1":
            raise RuntimeError(f"vlmfast: native CPU kernels not built: {reason} (VLMFAST_REQUIRE_NATIVE=1)")
        print(f"vlmfast: native CPU kernels not built: {reason}; installing the pure-PyTorch path only",
              file=sys.stderr)
        self.extensions = []  # nothing for the (editable) install to copy

    @staticmethod
    def _cannot_build():
        if os.environ.get("VLMFAST_BUILD_NATIVE", "1") == "0":
            return "VLMFAST_BUILD_NATIVE=0"
        missing = [tool for tool in ("cmake", os.environ.get("CXX", "c++")) if shutil.which(tool) is None]
        return f"{' and '.join(missing)} not found" if missing else None

    def build_extension(self, ext):
        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        configure = ["cmake", "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir,
                     f"-DPython_EXECUTABLE={sys.executable}", f"-DVLMFAST_OUTPUT={output}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", build_dir, "--parallel"], check=True)


setup(
    name="vlmfast",
    version=VERSION,
    description="Fast, instrumented post-training (SFT, OPD, GRPO, CW-DPO) for vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package under vlmfast/ (a list written by hand missed vlmfast.stages); never the top-level kernels/
    packages=find_packages(include=["vlmfast", "vlmfast.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["vlmfast = vlmfast.cli:main"]},
    ext_modules=[CMakeExtension("vlmfast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
