"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, before the
test modules import the package. On a CUDA machine the real kernels run instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed: fresh random inputs, reproducible failures."""
    torch.manual_seed(0)

