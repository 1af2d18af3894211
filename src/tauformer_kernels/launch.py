"""What every Triton launcher shares: the launch description, the rule tables that choose it, the device facts.

Each launcher has one config function (`lambda_forward_launch`, `forward_launches`, `backward_launches`, ...)
that returns `Launch`es: every constexpr and launch option of the kernel for the arguments' shape class. The
launcher passes them to the kernel; the compile check (compile_check.py) compiles exactly them for sm_80 and
sm_90 and fails on spills. Where a config differs from the launcher's base tiles, a `Rule` in a table says
when and why (a measured spill, a register budget): nothing else chooses a launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable

import torch

from .backends import triton_interpreting

# Every launch sets enable_fp_fusion (a*b + c as one FMA): the kernels' numerics and their static cycle
# estimates assume it, and Triton 3.10 turns its default off.
FP_FUSION = True

# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1 programs)
MAX_GRID_YZ = 65535


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a kernel: its constexprs and triton.compile's options."""
    constexprs: dict
    num_warps: int
    num_stages: int

    def options(self) -> dict:
        """The keyword arguments of `kernel[grid](..., **options())`."""
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages,
                    enable_fp_fusion=FP_FUSION)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A change to a launcher's base config: the settings it applies when `applies(shape)`, and why."""
    applies: Callable[..., bool]
    settings: dict
    why: str


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """What an attention launcher's config depends on: V's dtype, the padded head size of a program, ALiBi,
    the sm version, the 64-bit build, the GQA group, causality, a Triton before 3.9 (whose register
    allocation differs), and keys read through a block table (the forward's PAGED build)."""
    dtype: torch.dtype
    block_d: int
    has_alibi: bool
    arch: int
    wide: bool = False
    group: int = 1
    is_causal: bool = True
    old_triton: bool = False
    paged: bool = False

    @property
    def fp32(self) -> bool:
        return self.dtype == torch.float32


def apply_rules(base: dict, rules: tuple[Rule, ...], shape: LaunchShape) -> dict:
    """`base` with the settings of every rule that applies to `shape`, in table order (a later rule wins)."""
    config = dict(base)
    for rule in rules:
        if rule.applies(shape):
            config.update(rule.settings)
    return config


def block_size(n: int, minimum: int = 16) -> int:
    """The power-of-two tile that holds n (tl.dot needs at least 16 along every dimension)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def gpu_launch_configs() -> bool:
    """Whether the launchers use their GPU launch configs (tiles, warps, the GPU-only code paths such as the
    backward's inline-PTX exp2): always on a GPU; under the interpreter only when TAUFORMER_GPU_CONFIGS=1
    (the tests' --gpu-configs mode, which runs the GPU's code paths on the CPU with the interpreter's
    numerics emulated, tauformer_kernels/interpreter.py). Otherwise the interpreter gets small tiles."""
    return not triton_interpreting() or os.environ.get("TAUFORMER_GPU_CONFIGS", "0") not in ("", "0")


def triton_before(major: int, minor: int) -> bool:
    """Whether the installed Triton is older than major.minor (launch configs differ where its register
    allocation does: the compile check proves each version's configs spill-free)."""
    import triton

    found = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return found < (major, minor)


def arch_of(device: torch.device) -> int:
    """The sm version of a CUDA device (90 for CPU tensors: the interpreter runs the sm_90 configs)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def on_device(t: torch.Tensor):
    """The context a launch runs in: the CUDA device of `t` (a tensor on cuda:1 launches on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
