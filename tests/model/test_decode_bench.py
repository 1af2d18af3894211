"""The end-to-end decode bench (tauformer_model.decode_bench): one command measures every row."""

import pytest

from tauformer_model import decode_bench


def test_one_command_writes_every_row(tmp_path):
    out = tmp_path / "decode.md"
    assert decode_bench.main(["--prompt-lengths", "5,9", "--new-tokens", "4", "--no-cache-new-tokens", "2",
                              "--threads", "1", "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| random")]
    # taumode: cache, sorted, none; dot: cache, none; each at both prompt lengths
    assert [(r[1], r[2], r[3]) for r in rows] == [(a, m, p) for a, modes in (("taumode", MODES_TAU), ("dot", MODES_DOT))
                                                 for m in modes for p in ("5", "9")]
    for r in rows:
        assert float(r[5]) > 0 and float(r[8]) > 0 and float(r[10]) > 0  # prefill ms, tokens/s, peak RSS
        p50, p95 = map(float, r[7].split(" / "))
        assert 0 < p50 <= p95
    assert all(float(r[11].rstrip(" |")) == 0 for r in rows if r[2] == "none")
    assert rows[0][9].endswith("×") and rows[-1][9] == "–"  # taumode's tokens/s against dot's


def test_cache_bytes_are_the_caches():
    """(V, λk) fp32 is (F + 1) / 2F of (K, V): 6 layers, 6 kv heads of F = 64, max_len 5 + 4 + 1."""
    got = {a: decode_bench.measure(decode_bench.build("random", a, 10), "cache", 5, 4) for a in ("taumode", "dot")}
    assert got["dot"]["cache_bytes"] == 6 * 2 * 10 * 6 * 64 * 4
    assert got["taumode"]["cache_bytes"] == 6 * 10 * 6 * (64 + 1) * 4


MODES_TAU = ("cache", "sorted", "none")
MODES_DOT = ("cache", "none")


def test_bad_arguments_name_the_flag(capsys):
    for argv, flag in ((["--modes", "fast"], "--modes"), (["--new-tokens", "0"], "--new-tokens"),
                       (["--checkpoint", "nowhere"], "--checkpoint"), (["--prompt-lengths", "0"], "--prompt-lengths"),
                       (["--no-random"], "--checkpoint")):
        with pytest.raises(SystemExit):
            decode_bench.main(argv)
        assert flag in capsys.readouterr().err
