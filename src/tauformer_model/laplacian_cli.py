"""Build a Laplacian file from domain embeddings (an N×F .npy) with tauformer_kernels.knn_laplacian:
``python -m tauformer_model.laplacian_cli embeddings.npy --out lap.npz --k 8``

F must equal the model's head dim (n_embd // n_head); train with ``--laplacian lap.npz``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import tauformer_kernels as tk

from .train import print0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.laplacian_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", help="an .npy file holding an N×F matrix of domain embeddings")
    p.add_argument("--out", required=True, help="the Laplacian file to write (.npz)")
    p.add_argument("--k", type=int, default=8, help="nearest features each feature connects to")
    p.add_argument("--sigma", type=float, default=1.0, help="edge weight 1 / (1 + (d/sigma)^p)")
    p.add_argument("--p", type=float, default=2.0, help="exponent of the edge weight")
    p.add_argument("--eps-graph", type=float, default=None, help="keep only edges with cosine distance <= this")
    p.add_argument("--n-clusters", type=int, default=None, help="reduce the N rows to k-means centroids first")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emb = np.load(args.embeddings, allow_pickle=False)
    params = dict(k=args.k, sigma=args.sigma, p=args.p, eps_graph=args.eps_graph, n_clusters=args.n_clusters,
                  seed=args.seed)
    lap = tk.knn_laplacian(emb, **params)
    tk.save_laplacian(args.out, lap, source=str(args.embeddings), **params)
    edges = int((lap.diagonal() != 0).sum())
    print0(f"wrote {args.out}: {lap.shape[0]}×{lap.shape[1]} Laplacian from {emb.shape[0]} embeddings "
           f"({edges} connected features, trace {float(lap.trace()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
