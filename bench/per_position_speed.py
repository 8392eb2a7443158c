"""The two routes of the per-position sampled softmax, timed: gathered negative vectors vs whole-table logits.

    python bench/per_position_speed.py [--rows 900 --dim 256 --negatives 256 --items 12102 --rounds 3]

Forward + backward of PerPositionSampledSoftmax on random states and a random table, the routes alternating
(gathered, dense, gathered, ...), median seconds per call of each, one thread by default.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from objectives.losses import PerPositionSampledSoftmax, Similarity  # noqa: E402


class Table(torch.nn.Module):
    def __init__(self, items, dim):
        super().__init__()
        self.num_items = items - 1
        self.weight = torch.nn.Parameter(torch.randn(items, dim) * 0.1)

    def forward(self, ids=None):  # as model.ItemTower: no ids, the whole table
        return self.weight if ids is None else self.weight[ids]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=900)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--negatives", type=int, default=256)
    p.add_argument("--items", type=int, default=12102)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tower = Table(args.items, args.dim)
    states = torch.randn(args.rows, args.dim, requires_grad=True)
    pos = torch.randint(1, args.items, (args.rows,))
    negatives = SimpleNamespace(draw=lambda shape, device: torch.randint(1, args.items, shape))
    times = {"gathered": [], "dense": []}
    for _ in range(args.rounds):
        for route, factor in (("gathered", 0), ("dense", args.items)):
            loss = PerPositionSampledSoftmax(Similarity(False), args.negatives)
            loss.DENSE_ITEMS_PER_NEGATIVE = factor  # 0: always gather; items: always the whole table
            start = time.perf_counter()
            loss(states, pos, tower, negatives).loss.backward()
            times[route].append(time.perf_counter() - start)
    for route, t in times.items():
        print(f"{route:9s} median {statistics.median(t):.3f} s  ({', '.join(f'{x:.3f}' for x in t)})")


if __name__ == "__main__":
    main()
