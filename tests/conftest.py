"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, before the
test modules import the package. On a CUDA machine the real kernels run instead. In the interpreter the
GPU's numerics are emulated (tauformer_kernels/interpreter.py): bf16 as bf16, tf32/tf32x3 products
rounded as the tensor cores round them, the backward's PTX exp2 with its flush to zero.
"""
import importlib.util
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        from tauformer_kernels.interpreter import enable_gpu_numerics

        enable_gpu_numerics()

# torch.compile's on-disk caches outlive a change of this package's op schemas (a stale compiled graph
# called an op with its old arguments): each test session compiles into its own folder
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tauformer-inductor-"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed: fresh random inputs, reproducible failures."""
    torch.manual_seed(0)
