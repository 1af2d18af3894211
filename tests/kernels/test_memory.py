"""The chunked reference never holds all T² logits: its peak memory against the naive oracle's."""
import subprocess
import sys
import textwrap

import pytest

PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from tauformer_kernels import reference

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    torch.manual_seed(0)
    b, h, t, f = 1, 8, 4096, 64
    lq, lk = torch.rand(b, h, t), torch.rand(b, h, t)
    v = torch.randn(b, h, t, f)
    temp = torch.full((h,), 0.05)
    before = rss_kib("VmRSS:")
    with torch.no_grad():
        if sys.argv[1] == "naive":
            reference.attention_naive(lq, lk, v, temp, None, True)
        else:
            reference.attention_fwd_chunked(lq, lk, v, temp, None, True)
    print(rss_kib("VmHWM:") - before)
    """
)


def _peak_kib(which: str) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, which], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_chunked_peak_memory_is_under_a_quarter_of_naive():
    naive, chunked = _peak_kib("naive"), _peak_kib("chunked")
    print(f"peak memory above the inputs at B=1 H=8 T=4096 F=64: naive {naive / 1024:.0f} MiB, "
          f"chunked {chunked / 1024:.0f} MiB")
    assert chunked < naive / 4
