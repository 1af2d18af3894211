"""Fixtures of the kernel tests."""

import pytest
import torch


@pytest.fixture(params=["interpreter-tiles", "gpu-tiles"])
def tiles(request, monkeypatch):
    """Run a Triton test twice without a GPU: with the interpreter's tiles and with the GPU's tiles
    (TAUFORMER_GPU_CONFIGS, tests/kernels/test_gpu_configs.py)."""
    if request.param == "gpu-tiles":
        if torch.cuda.is_available():
            pytest.skip("on a GPU the launchers take the GPU's tiles anyway")
        monkeypatch.setenv("TAUFORMER_GPU_CONFIGS", "1")
    return request.param
