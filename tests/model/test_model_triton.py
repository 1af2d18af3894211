"""Training through the Triton kernels (interpreter on CPU) gives the reference path's losses."""
import pytest
import torch

from tauformer_kernels.backends import triton_available, triton_interpreting
from tauformer_model import TauGPT, TauGPTConfig

pytestmark = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or triton_interpreting()),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)


def _losses(backend: str, steps: int = 20) -> list[float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TauGPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=256, block_size=24,
                          recency="learned", backend=backend)
    torch.manual_seed(0)
    model = TauGPT(config).to(device)
    # periodic sequences (token = start + 3·t mod 64): learnable, so the loss must fall
    starts = torch.randint(0, 64, (steps, 2, 1), generator=torch.Generator().manual_seed(1))
    data = ((starts + 3 * torch.arange(25)) % 64).to(device)
    model.calibrate_tau(data[0, :, :-1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in data:
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_twenty_training_steps_match_the_reference_backend():
    triton_losses, reference_losses = _losses("triton"), _losses("reference")
    assert reference_losses[-1] < reference_losses[0]  # it trains
    for step, (a, b) in enumerate(zip(triton_losses, reference_losses)):
        assert abs(a - b) < 1e-4, f"step {step}: triton {a:.6f} vs reference {b:.6f}"
