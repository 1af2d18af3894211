"""Grid helpers shared by the kernels (device code only)."""
import triton
import triton.language as tl


@triton.jit
def block_and_head(num_blocks, H):
    """(block, b, h, b·H + h) of this program on a grid of (num_blocks·B·H,), the blocks of one (batch, head)
    consecutive on axis 0 (which takes up to 2^31 - 1 programs). b, h and b·H + h are 64-bit: b·stride_b and
    (b·H + h)·T pass 2^31 elements on large tensors."""
    block = tl.program_id(0) % num_blocks
    pid_bh = tl.cast(tl.program_id(0) // num_blocks, tl.int64)
    return block, pid_bh // H, pid_bh % H, pid_bh
