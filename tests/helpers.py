"""Input factories shared by the tests."""
import torch

from tauformer_kernels import reference


def random_lambdas(b, h, hkv, tq, tk, *, dtype=torch.float64, device="cpu"):
    """λq, λk uniform in [0, 1), as the projection produces them."""
    lq = torch.rand(b, h, tq, dtype=dtype, device=device)
    lk = torch.rand(b, hkv, tk, dtype=dtype, device=device)
    return lq, lk


def random_heads(b, h, hkv, tq, tk, f, dv, *, dtype=torch.float64, device="cpu"):
    q = torch.randn(b, h, tq, f, dtype=dtype, device=device)
    k = torch.randn(b, hkv, tk, f, dtype=dtype, device=device)
    v = torch.randn(b, hkv, tk, dv, dtype=dtype, device=device)
    return q, k, v


def per_head(value, heads, dtype=torch.float64):
    return torch.full((heads,), float(value), dtype=dtype)


def oracle_attention(q, k, v, laplacian, tau_kv, temperature, alibi_slopes=None, is_causal=True, eps=1e-6):
    """The float64 composition of the two oracles."""
    group = q.shape[1] // k.shape[1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    lq = reference.lambda_naive(q.double(), laplacian.double(), tau_kv.double().repeat_interleave(group), eps)
    lk = reference.lambda_naive(k.double(), laplacian.double(), tau_kv.double(), eps)
    return reference.attention_naive(lq, lk, v.double(), temperature.double(), d(alibi_slopes), is_causal)


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-300) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64. A floor keeps gradients that are exactly zero in the
    reference (one key per row: softmax is constant) from dividing rounding noise by zero."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()  # either may be on the GPU
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def temperature_tolerance(base: float, temperature: float) -> float:
    """fp32 rounding of λ (~6e-8) is amplified by 1/temperature in the logits: scale the tolerance."""
    return base * max(1.0, 0.01 / temperature)
