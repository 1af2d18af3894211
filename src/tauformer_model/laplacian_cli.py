"""Build a domain Laplacian ("domain memory", docs/math.md §The Laplacian) from F-dim vectors of a corpus:

    # the vectors you bring: an N×F .npy of embeddings
    python -m tauformer_model.laplacian_cli --embeddings emb.npy --out lap.npz --k 8
    # or the keys a trained model gives a corpus (its first layer's keys as λ sees them: RoPE'd, RMS-normed)
    python -m tauformer_model.laplacian_cli --keys-from runs/tiny --data my_corpus/ --out lap.npz

then train with ``--laplacian lap.npz``. F must be the model's head dim (n_embd // n_head). An --out
ending in .parquet writes the reference crate's manifold pair (manifold.parquet + manifold.json).
--builder arrowspace builds with the arrowspace package (pip install "tauformer[arrowspace]") instead of
this package's exact kNN (tauformer_kernels.knn_laplacian).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import tauformer_kernels as tk

from .checkpoint import load_model, load_state
from .common import nonnegative_int, output_file, positive_float, positive_int, print0
from .data import load_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.laplacian_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="an .npy file holding an N×F matrix of domain embeddings")
    source.add_argument("--keys-from", metavar="RUN", help="a training run (or checkpoint) folder: use its first "
                        "layer's keys over --data")
    p.add_argument("--data", default=None, help="with --keys-from: the corpus (a text file or folder; default: the "
                   "one the run trained on)")
    p.add_argument("--windows", type=positive_int, default=64, help="with --keys-from: windows of the model's "
                   "context, spread evenly over the corpus's training split; every kv head of every token gives one "
                   "vector")
    p.add_argument("--out", type=output_file, required=True,
                   help="the Laplacian file to write (.npz, or .parquet for the crate's format)")
    p.add_argument("--builder", choices=("knn", "arrowspace"), default="knn",
                   help="exact kNN over features (this package) or arrowspace's builder")
    p.add_argument("--k", type=positive_int, default=8, help="nearest features each feature connects to")
    p.add_argument("--sigma", type=positive_float, default=1.0, help="edge weight 1 / (1 + (d/sigma)^p)")
    p.add_argument("--p", type=positive_float, default=2.0, help="exponent of the edge weight")
    p.add_argument("--eps-graph", type=positive_float, default=None, help="keep only edges with cosine distance "
                   "<= this (in (0, 2]; arrowspace: its eps, default 1.0)")
    p.add_argument("--n-clusters", type=positive_int, default=None,
                   help="knn: reduce the N rows to k-means centroids first")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the k-means")
    return p


@torch.no_grad()
def corpus_keys(run: str, data: str | None, windows: int) -> np.ndarray:
    """(N, F) float64: the first layer's keys of a trained model over `windows` evenly spread windows."""
    model, _ = load_model(run)
    if model.config.attention != "taumode":
        raise ValueError(f"{run}: a taumode model is needed for its keys (got attention={model.config.attention!r})")
    train_config = load_state(run)["train_config"]
    dataset = load_dataset(data or train_config["data"], tokenizer=train_config["tokenizer"],
                           vocab_size=train_config["bpe_vocab_size"], log=print0)
    block = model.config.block_size
    starts = dataset.evaluation_starts("train", windows, block)
    idx, _ = dataset.windows("train", starts, block)
    keys = torch.cat([model.eval().first_layer_keys(chunk) for chunk in idx.split(16)])
    return keys.reshape(-1, keys.shape[-1]).double().numpy()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return build(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        # the messages name the file or the value: a bad run (CheckpointError is a RuntimeError), corpus (DataError
        # is a ValueError) or embeddings file, a k the data cannot take, arrowspace or pyarrow missing
        print0(f"error: {e}", file=sys.stderr)
        return 1


def build(args: argparse.Namespace) -> int:
    if args.embeddings:
        emb, source = np.load(args.embeddings, allow_pickle=False), str(args.embeddings)
    else:
        emb, source = corpus_keys(args.keys_from, args.data, args.windows), f"keys of {args.keys_from}"
    start = time.perf_counter()
    if args.builder == "knn":
        params = dict(k=args.k, sigma=args.sigma, p=args.p, eps_graph=args.eps_graph, n_clusters=args.n_clusters,
                      seed=args.seed)
        lap = tk.knn_laplacian(emb, **params)
    else:
        params = dict(k=args.k, sigma=args.sigma, p=args.p, eps=1.0 if args.eps_graph is None else args.eps_graph)
        lap = tk.arrowspace_laplacian(emb, **params)
    seconds = time.perf_counter() - start
    edges = int((lap.diagonal() != 0).sum())
    if edges == 0:  # an all-zero Laplacian makes every λ 0: the λ term would silently vanish from the model
        raise ValueError(f"the graph has no edges (k {args.k}, --eps-graph {args.eps_graph}): no two features are "
                         "that close; raise --eps-graph (cosine distances lie in [0, 2])")
    tk.save_laplacian(args.out, lap, source=source, builder=args.builder, **params)
    print0(f"wrote {args.out}: {lap.shape[0]}×{lap.shape[1]} Laplacian ({args.builder}, {seconds:.2f} s) from "
           f"{emb.shape[0]} vectors ({source}); {edges} connected features, trace {float(lap.trace()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
