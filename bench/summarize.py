"""Turn a pytest-benchmark JSON file into the results table: medians and ratios ours / each peer.

    python -m bench.summarize RESULTS.json [--out bench/results] [--name cpu-epyc-2t]
    python bench/summarize.py RESULTS.json --out bench/results

Writes <out>/<device>.md and <out>/<device>.json, where <device> is derived from the run's device
(`cpu-<model>-<threads>t` or `cuda-<gpu name>`) unless --name is given. "ours" is `ours-auto`, the path a
user gets; a ratio below 1 means ours is faster. On CUDA the medians are triton.testing.do_bench's (CUDA
events); on CPU pytest-benchmark's. Lines of kernels/DESIGN.md that state a floor are copied in for GPU
runs, so each measured time sits beside what the hardware allows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

OURS = "ours-auto"
CONTENDER_ORDER = ("ours-auto", "ours-reference", "ours-triton", "ours-loglinear", "ours-numba", "ours-sorted-cache",
                   "naive-eager", "flex-compiled", "sdpa-dot", "torch-einsum", "sdpa-dot-cache")
PEERS = {  # the ratio columns of each kind's pivot table
    "attn-fwd": ("flex-compiled", "sdpa-dot", "naive-eager", "ours-reference", "ours-loglinear", "ours-triton"),
    "attn-fwdbwd": ("flex-compiled", "sdpa-dot", "naive-eager", "ours-reference", "ours-loglinear", "ours-triton"),
    "lambda": ("torch-einsum", "ours-reference", "ours-triton"),
    "decode": ("sdpa-dot-cache", "ours-sorted-cache", "ours-reference", "ours-loglinear", "ours-triton"),
    "varlen-fwdbwd": ("ours-padded",),
}
KIND_TITLES = {
    "attn-fwd": "Attention forward (causal)",
    "attn-fwdbwd": "Attention forward + backward (causal)",
    "lambda": "λ projection alone",
    "decode": "Decode step: one query over a cache of N tokens",
    "varlen-fwdbwd": "Mixed lengths, forward + backward: packed (cu_seqlens) vs padded to the longest "
                     "(T = real tokens)",
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|processor|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(info: dict) -> str:
    if info.get("device") == "cuda":
        return "cuda-" + slug(info.get("device_name", "gpu"))
    return f"cpu-{slug(info.get('cpu', 'cpu'))}-{info.get('cpu_threads', '?')}t"


def rows_of(data: dict) -> list[dict]:
    rows = []
    for bm in data["benchmarks"]:
        extra = bm.get("extra_info", {})
        if "contender" not in extra:
            continue
        stats = bm.get("stats") or {}
        median = extra.get("do_bench_median_s", stats.get("median"))
        if median is None:
            continue
        # a call that times several decode steps (the sorted cache's tail cycle) is reported per step
        per = extra.get("steps_per_call", 1)
        median = median / per
        stats = {k: (v / per if k in ("min", "iqr") and v is not None else v) for k, v in stats.items()}
        shape = extra["shape"]
        rows.append({
            "group": bm["group"], "kind": extra["kind"], "contender": extra["contender"],
            "backend": extra.get("backend"), "auto_backend": extra.get("auto_backend"),
            "shape": shape, "dtype": extra["dtype"], "device": extra["device"],
            "median_s": median, "min_s": stats.get("min"), "iqr_s": stats.get("iqr"), "rounds": stats.get("rounds"),
            "iterations": stats.get("iterations"), "timer": extra.get("timer"),
            "rel_error": extra.get("rel_error", (extra.get("rel_errors") or {}).get("out")),
            "rel_errors": extra.get("rel_errors"), "cache_bytes": extra.get("cache_bytes"),
            "cache_bytes_vs_kv": extra.get("cache_bytes_vs_kv"),
        })
    return rows


def ratios(rows: list[dict]) -> dict:
    """{group: {peer: ours_median / peer_median}} for every group where ours ran."""
    by_group = defaultdict(dict)
    for r in rows:
        by_group[r["group"]][r["contender"]] = r["median_s"]
    out = {}
    for group, medians in sorted(by_group.items()):
        if OURS in medians:
            out[group] = {c: medians[OURS] / m for c, m in medians.items() if c != OURS and m > 0}
    return out


def fmt_time(seconds) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _order(contender: str) -> int:
    return CONTENDER_ORDER.index(contender) if contender in CONTENDER_ORDER else len(CONTENDER_ORDER)


def pivot(kind: str, rows: list[dict]) -> list[str]:
    """One table per kind: a row per shape, a median column per contender, then ours / peer ratios."""
    rows = [r for r in rows if r["kind"] == kind]
    if not rows:
        return []
    contenders = sorted({r["contender"] for r in rows}, key=_order)
    shapes = sorted({tuple(r["shape"]) + (r["dtype"],) for r in rows}, key=lambda s: (s[3], s[2], s[0], s[1]))
    cell = {(tuple(r["shape"]) + (r["dtype"],), r["contender"]): r for r in rows}
    ours_name = "ours-packed" if kind == "varlen-fwdbwd" else OURS
    peers = [p for p in PEERS[kind] if p in contenders and ours_name in contenders]
    label = "N" if kind == "decode" else "T"
    head = ["B", "H", label, "F", "dtype"] + [f"{c} ms" for c in contenders] + [f"ours/{p}" for p in peers]
    if kind == "decode":
        head += ["cache bytes (V, λk)", "vs (K, V)"]
    lines = [f"### {KIND_TITLES[kind]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        med = {c: cell[(shape, c)]["median_s"] for c in contenders if (shape, c) in cell}
        ours = med.get(ours_name)
        cols = [str(x) for x in shape]
        cols += [fmt_time(med.get(c)) for c in contenders]
        cols += [fmt_ratio(ours / med[p] if ours is not None and p in med else None) for p in peers]
        if kind == "decode":
            ours_row = cell.get((shape, OURS))
            cols += [f"{ours_row['cache_bytes']:,}" if ours_row else "—",
                     fmt_ratio(ours_row["cache_bytes_vs_kv"]) if ours_row else "—"]
        lines.append("| " + " | ".join(cols) + " |")
    autos = sorted({f"T={r['shape'][2]}→{r['auto_backend']}" for r in rows
                    if r["contender"] == OURS and r.get("auto_backend")}, key=lambda s: int(s[2:s.index("→")]))
    if autos:
        lines += ["", "`auto` resolved to: " + ", ".join(autos)]
    return lines + [""]


def details(rows: list[dict]) -> list[str]:
    lines = ["## Every benchmark", "",
             "| group | contender | median ms | min ms | IQR ms | rounds×iterations | rel. error vs float64 |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["group"], _order(r["contender"]))):
        errs = r["rel_errors"] or {"out": r["rel_error"]}
        err = ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if v is not None)
        lines.append(f"| {r['group']} | {r['contender']} | {fmt_time(r['median_s'])} | {fmt_time(r['min_s'])} | "
                     f"{fmt_time(r['iqr_s'])} | "
                     f"{r['rounds']}×{r['iterations']} | {err} |")
    return lines + [""]


def floors_from_notes(path: str) -> list[str]:
    """Table rows and lines of kernels/DESIGN.md that mention a floor (the kernels' stated lower bounds)."""
    if not os.path.exists(path):
        return [f"(no {os.path.relpath(path, _REPO)} yet: no floors to show)"]
    with open(path) as f:
        text = f.read().splitlines()
    picked, in_table = [], False
    for line in text:
        if line.startswith("|") and ("floor" in line.lower() or in_table):
            picked.append(line)
            in_table = True
        elif "floor" in line.lower():
            picked.append(line)
            in_table = False
        else:
            in_table = in_table and line.startswith("|")
    return picked or ["(kernels/DESIGN.md states no floor yet)"]


def headline(rows: list[dict]) -> list[str]:
    """The headline ratios: at each attention length, ours / FlexAttention and ours / SDPA."""
    rat = ratios(rows)
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "attn-fwd" and r["contender"] == OURS),
                    key=lambda r: (r["shape"][3], r["shape"][2])):
        g = rat.get(r["group"], {})
        lines.append(f"- forward T={r['shape'][2]} F={r['shape'][3]}: ours/flex-compiled "
                     f"{fmt_ratio(g.get('flex-compiled'))}, ours/sdpa-dot {fmt_ratio(g.get('sdpa-dot'))}"
                     f" (ours-auto → {r.get('auto_backend')}, {fmt_time(r['median_s'])} ms)")
    return lines


def render(data: dict, rows: list[dict], source: str) -> str:
    info = data.get("machine_info", {}).get("tauformer", {})
    commit = info.get("git_commit") or data.get("commit_info", {}).get("id", "unknown")
    dirty = info.get("git_dirty", data.get("commit_info", {}).get("dirty"))
    timer = ("triton.testing.do_bench median (CUDA events)" if info.get("device") == "cuda"
             else "pytest-benchmark median (perf_counter), pedantic rounds")
    lines = [
        f"# Benchmarks: {info.get('device_name', '?')}", "",
        f"- device: {info.get('device')} — {info.get('device_name')}",
        f"- torch {info.get('torch')}, triton {info.get('triton')}, python {info.get('python')}"
        + (f", CUDA {info['cuda']}" if info.get("cuda") else ""),
        f"- commit {commit}{' (working tree had uncommitted changes)' if dirty else ''}",
        f"- run {data.get('datetime', '?')}; source `{os.path.basename(source)}`",
        f"- timer: {timer}; times are medians in milliseconds",
        f"- taumode parameters: temperature {info.get('temperature')}, tau {info.get('tau')}, chain Laplacian; "
        "inputs random normal; every contender checked against a float64 oracle before timing",
        "- **ours** = `taumode_attention(..., backend=\"auto\")`; `ours/peer` < 1 means ours is faster",
        "- peers: `flex-compiled` = torch.compile(flex_attention) with the taumode score_mod and a causal "
        "block mask; `sdpa-dot` = F.scaled_dot_product_attention(q, k, v, is_causal=True), ordinary "
        "dot-product attention at the same shape (a different function: its cost, not its output); "
        "`naive-eager` = reference.lambda_naive + reference.attention_naive",
        "",
    ]
    if info.get("quick"):
        lines += ["**Quick (smoke-test) grid: tiny shapes, not a measurement.**", ""]
    lines += ["## Headline", ""] + (headline(rows) or ["(no attention forward results)"]) + [""]
    lines += ["## Tables", ""]
    for kind in KIND_TITLES:
        lines += pivot(kind, rows)
    if info.get("device") == "cuda":
        lines += (["## Floors (kernels/DESIGN.md)", ""]
                  + floors_from_notes(os.path.join(_REPO, "kernels", "DESIGN.md")) + [""])
    skipped = data.get("skipped") or []
    if skipped:
        lines += ["## Skipped", "", "| benchmark | reason |", "|---|---|"]
        lines += [f"| {s['test'].split('::')[-1]} | {s['reason']} |" for s in skipped]
        lines += [""]
    lines += details(rows)
    return "\n".join(lines)


def summarize(source: str, out_dir: str, name: str | None = None) -> tuple[str, str]:
    with open(source) as f:
        data = json.load(f)
    rows = rows_of(data)
    info = data.get("machine_info", {}).get("tauformer", {})
    name = name or device_slug(info)
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")
    with open(md_path, "w") as f:
        f.write(render(data, rows, source))
    summary = {
        "device": info, "datetime": data.get("datetime"), "commit_info": data.get("commit_info"),
        "pytest_benchmark_version": data.get("version"), "ours": OURS,
        "results": sorted(rows, key=lambda r: (r["group"], _order(r["contender"]))),
        "ratios_ours_over_peer": ratios(rows), "skipped": data.get("skipped", []),
    }
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    return md_path, json_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Summarise a pytest-benchmark JSON of `pytest bench/` into "
                                                 "bench/results/<device>.md and .json.")
    parser.add_argument("source", help="the JSON written by `pytest bench/ --benchmark-json FILE`")
    parser.add_argument("--out", default=os.path.join(_REPO, "bench", "results"),
                        help="folder for <device>.md and <device>.json (default: bench/results)")
    parser.add_argument("--name", default=None, help="file stem instead of the derived device name")
    args = parser.parse_args(argv)
    md_path, json_path = summarize(args.source, args.out, args.name)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
