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


@triton.jit
def sequence_rows(CU, b, B, total):
    """(start, length) of the rows of sequence b of a pack of B sequences whose int32 offsets (B + 1,) are CU,
    clamped into [0, total] (total: the rows of the packed tensor), so that no offset, however wrong, reaches
    outside it: sequence 0 starts at row 0, sequence b ends at max(its start, CU[b + 1]), and b = B is the
    rows past the last offset (docs/math.md §Packed sequences, varlen.effective). The launchers pass the
    running maximum of the offsets (varlen.monotone), which keeps the sequences apart; the clamps alone
    keep every access inside the tensor."""
    start = tl.minimum(tl.maximum(tl.load(CU + b, mask=b > 0, other=0), 0), total)
    end = tl.load(CU + b + 1, mask=b < B, other=total)
    return start, tl.minimum(tl.maximum(end, start), total) - start
