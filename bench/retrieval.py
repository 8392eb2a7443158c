"""Retrieval speed and recall: FAISS Flat / IVF / HNSW and torch matmul + topk.

    python bench/retrieval.py                          # 100k and 1M items, 10k queries, d=64
    python bench/retrieval.py --items 100000 --queries 2000

Catalogue and queries are L2-normalised draws around 2,000 random centres (real item embeddings are
clustered; uniform random vectors are the worst case for any ANN index). Recall@10 is measured
against the exact (Flat) result.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval.infer import build_index, choose_blas_kernel, search  # noqa: E402

choose_blas_kernel()  # before faiss is first imported (build_index imports it)


def clustered(n, d, centres, rng, noise=1.0):
    x = centres[rng.integers(len(centres), size=n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def recall(approx, exact):
    return float(np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(approx, exact, strict=True)]))


def torch_topk(items, queries, k, chunk=1024):
    items_t = torch.from_numpy(items)
    out = [torch.topk(torch.from_numpy(queries[s:s + chunk]) @ items_t.T, k, dim=1).indices
           for s in range(0, len(queries), chunk)]
    return torch.cat(out).numpy()


def bench(n_items, n_queries, d, k, args):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    items, queries = clustered(n_items, d, centres, rng), clustered(n_queries, d, centres, rng)
    print(f"\n{n_items:,} items, {n_queries:,} queries, d={d}, k={k}, {torch.get_num_threads()} threads")
    print(f"{'method':<34}{'build s':>9}{'queries/s':>11}{'recall@10':>11}")
    flat, build = timed(lambda: build_index(items, "flat", "cpu", verbose=False))
    (exact, _), secs = timed(lambda: search(flat, queries, k))
    base_qps = n_queries / secs
    print(f"{'faiss Flat (exact)':<34}{build:>9.1f}{base_qps:>11.0f}{1.0:>11.4f}")
    found, secs = timed(lambda: torch_topk(items, queries, k))
    print(f"{'torch matmul + topk':<34}{0:>9.1f}{n_queries / secs:>11.0f}{recall(found, exact):>11.4f}")
    ivf, build = timed(lambda: build_index(items, "ivf", "cpu", nlist=args.nlist, verbose=False))
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        (found, _), secs = timed(lambda: search(ivf, queries, k))
        print(f"{f'faiss IVF nlist={ivf.nlist} nprobe={nprobe}':<34}{build:>9.1f}{n_queries / secs:>11.0f}"
              f"{recall(found, exact):>11.4f}")
    hnsw, build = timed(lambda: build_index(items, "hnsw", "cpu", hnsw_m=args.hnsw_m,
                                            ef_construction=args.ef_construction, verbose=False))
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        (found, _), secs = timed(lambda: search(hnsw, queries, k))
        print(f"{f'faiss HNSW M={args.hnsw_m} ef={ef}':<34}{build:>9.1f}{n_queries / secs:>11.0f}"
              f"{recall(found, exact):>11.4f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=0, help="0: about 4 * sqrt(items)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hnsw_m", type=int, default=32)
    p.add_argument("--ef_construction", type=int, default=100)
    p.add_argument("--ef_search", type=int, nargs="+", default=[32, 64, 128])
    args = p.parse_args()
    for n in args.items:
        bench(n, args.queries, args.dim, args.k, args)


if __name__ == "__main__":
    main()
