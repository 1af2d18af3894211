"""pytest-benchmark setup for `pytest bench/`: options, the session's grid, skip rules, and the record.

    pytest bench/                                   the full grid on this device (CPU: ~14 min)
    pytest bench/ --benchmark-disable               smoke test: tiny shapes, correctness checks only
    pytest bench/ --benchmark-json out.json         save the numbers; then python -m bench.summarize out.json

Options (all optional): --bench-device cpu|cuda, --bench-quick, --bench-lengths 1024,4096,
--bench-head-dims 64,128, --bench-contexts 1024,32768, --bench-budget SECONDS.

The root `pytest` does not collect this folder (pyproject: testpaths = ["tests"]). Unlike tests/, nothing
here sets TRITON_INTERPRET: the interpreter is a test tool, so backend "triton" runs only on CUDA.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import benchlib` from the test modules

import benchlib  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else None


def pytest_addoption(parser):
    group = parser.getgroup("tauformer bench")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark on (default: cuda when available, else cpu)")
    group.addoption("--bench-quick", action="store_true",
                    help="tiny shapes (implied by --benchmark-disable): a smoke test of every contender")
    group.addoption("--bench-lengths", default=None, help="comma-separated sequence lengths T (attention, λ)")
    group.addoption("--bench-head-dims", default=None, help="comma-separated head dims F")
    group.addoption("--bench-contexts", default=None, help="comma-separated decode cache lengths")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds after which the remaining benchmarks are skipped (for time-boxed GPU runs)")


def _settings(config) -> benchlib.Settings:
    cached = getattr(config, "_tauformer_settings", None)
    if cached is not None:
        return cached
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = bool(config.getoption("--bench-quick") or config.getoption("benchmark_disable", default=False))
    settings = benchlib.Settings.make(device, quick, _ints(config.getoption("--bench-lengths")),
                                      _ints(config.getoption("--bench-head-dims")),
                                      _ints(config.getoption("--bench-contexts")))
    config._tauformer_settings = settings
    return settings


def pytest_generate_tests(metafunc):
    """Cases in run order: by shape, then contender, so each contender's previous length is known when
    the next one is gated, and a group's contenders run next to each other."""
    s = _settings(metafunc.config)
    if "attn_case" in metafunc.fixturenames:
        contenders = benchlib.OURS + benchlib.ATTENTION_PEERS
        cases = [(f, t, c) for f in s.head_dims for t in s.lengths for c in contenders]
        metafunc.parametrize("attn_case", cases, ids=[f"F{f}-T{t}-{c}" for f, t, c in cases])
    if "lambda_case" in metafunc.fixturenames:
        cases = [(f, t, c) for f in s.head_dims for t in s.lengths for c in benchlib.LAMBDA_CONTENDERS]
        metafunc.parametrize("lambda_case", cases, ids=[f"F{f}-T{t}-{c}" for f, t, c in cases])
    if "decode_case" in metafunc.fixturenames:
        cases = [(f, n, c) for f in s.head_dims for n in s.contexts for c in benchlib.DECODE_CONTENDERS]
        metafunc.parametrize("decode_case", cases, ids=[f"F{f}-N{n}-{c}" for f, n, c in cases])


class BenchSession:
    """Per-session state: the settings, each contender's last call time (for the quadratic guard) and the
    time budget."""

    def __init__(self, settings: benchlib.Settings, budget_s: float | None):
        self.settings = settings
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.last_call: dict = {}

    def gate(self, kind: str, contender: str, length: int, head_dim: int, reason: str | None = None):
        """Skip (with the reason) a contender that cannot or should not run at this length."""
        s = self.settings
        if reason:
            pytest.skip(reason)
        if self.budget_s is not None and time.perf_counter() - self.start > self.budget_s:
            pytest.skip(f"time budget of {self.budget_s:.0f} s spent")
        # caps and growth are those of the backend that actually runs (for ours-auto: what auto picks)
        runs_as = contender.removeprefix("ours-")
        if runs_as == "auto":
            runs_as = benchlib.auto_resolves_to(s.device, s.dtype, length, needs_grad=kind == "attn-fwdbwd")
        for key in (f"{runs_as}/{kind}", runs_as):
            cap = s.max_len.get(key)
            if cap is not None:
                if length > cap:
                    what = contender if runs_as == contender else f"{contender} (runs as {runs_as})"
                    pytest.skip(f"{what} is capped at T={cap} on {s.device} in {kind}")
                break
        last = self.last_call.get((kind, contender, head_dim))
        if last is not None and not s.quick:
            t0, call_s = last
            power = benchlib.GROWTH.get(runs_as, 2.0)
            predicted = call_s * (length / t0) ** power
            if predicted > s.call_cap_s:
                pytest.skip(f"predicted {predicted:.0f} s per call at T={length} (T^{power} from {call_s:.2f} s "
                            f"at T={t0}) > cap {s.call_cap_s:.0f} s")

    def warm_and_time(self, benchmark, kind, contender, length, head_dim, fn, first_call_s):
        """After the correctness call (which took first_call_s): one more warm call where the first may
        have included compilation or was short, then time. Records the call time for the guard."""
        s = self.settings
        call_s = first_call_s
        if not benchmark.disabled and (contender == "flex-compiled" or first_call_s < 1.0):
            call_s = benchlib.wall_time(fn, s.device)
        self.last_call[(kind, contender, head_dim)] = (length, call_s)
        benchmark.extra_info["warm_call_s"] = round(call_s, 6)
        benchlib.run_benchmark(benchmark, fn, s.device, call_s)


@pytest.fixture(scope="session")
def bench(request) -> BenchSession:
    config = request.config
    session = getattr(config, "_tauformer_bench", None)
    if session is None:
        session = BenchSession(_settings(config), config.getoption("--bench-budget"))
        config._tauformer_bench = session
    return session


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# the record: versions, device, commit, and which benchmarks were skipped and why
# ----------------------------------------------------------------------------------------------------

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("TAUFORMER_COMMIT", "unknown"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device_name"] = f"{info['cpu']} ({info['cpu_threads']} threads)"
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    s = _settings(config)
    machine_info["tauformer"] = device_info(s.device) | {
        "quick": s.quick, "temperature": benchlib.TEMPERATURE, "tau": benchlib.TAU}


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


_SKIPPED: list = []


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)


def pytest_terminal_summary(terminalreporter, config):
    bench_session = getattr(config, "_tauformer_bench", None)
    if bench_session is not None:
        elapsed = time.perf_counter() - bench_session.start
        terminalreporter.write_line(f"tauformer bench: {bench_session.settings.device}, "
                                    f"{'quick' if bench_session.settings.quick else 'full'} grid, "
                                    f"{elapsed:.0f} s in benchmarks, {len(_SKIPPED)} skipped")
