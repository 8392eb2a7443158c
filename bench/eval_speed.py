"""Encoding users for evaluation, timed: batches in the log's order vs batches of similar history length, and
the last layer computing every position vs the last position alone (what evaluation and inference use).

    python bench/eval_speed.py [--data ../shared/data/Beauty.txt --batch 256 --rounds 3 --threads 2]
    python bench/eval_speed.py --ways "every position" "last position" --maxlen 101 --encoder hstu --num_blocks 1

A model of the default recipe's shape (d 256, 2 blocks, maxlen 50; fresh weights: the cost does not depend
on them) embeds every evaluated user's validation history, `--batch` users at a time. A left-padded batch is
as wide as its longest history, so in the log's order most batches are maxlen wide. The ways alternate
(log order, every position, last position, log order, ...); medians of `--rounds` of each, and whether all gave
the same vectors.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import ModelConfig  # noqa: E402
from dataset import LeaveOneOut, left_padded, length_batches  # noqa: E402
from model import SASRec  # noqa: E402
from readers.logs import load_interactions  # noqa: E402

# way -> (batch order, last layer computes the last position alone)
WAYS = {"log order": ("log order", True), "every position": ("by length", False),
        "last position": ("by length", True)}


def embed(model, items, ends, lengths, batches, last_only):
    out = np.zeros((len(ends), model.config.hidden_units), np.float32)
    with torch.no_grad():
        for b in batches:
            seqs = torch.from_numpy(left_padded(items, ends[b], lengths[b], int(lengths[b].max())))
            out[b] = model.sequence_states(seqs, last_only=last_only)[:, -1].numpy()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Beauty.txt"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    p.add_argument("--maxlen", type=int, default=50)
    p.add_argument("--hidden_units", type=int, default=256)
    p.add_argument("--num_blocks", type=int, default=2)
    p.add_argument("--encoder", default="sasrec", choices=["sasrec", "hstu"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_interactions(args.data)
    split = LeaveOneOut(data)
    _, ends, lengths, _ = split.eval_arrays("valid")
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=data.num_items, maxlen=args.maxlen, hidden_units=args.hidden_units,
                               num_blocks=args.num_blocks, encoder=args.encoder)).eval()
    lengths = np.minimum(lengths, model.config.maxlen)
    orders = {"log order": [np.arange(s, min(s + args.batch, len(ends))) for s in range(0, len(ends), args.batch)],
              "by length": length_batches(lengths, args.batch)}
    print(f"{args.data}: {len(ends)} users, mean history {lengths.mean():.1f} (maxlen {args.maxlen}), "
          f"{args.threads} threads, {args.encoder} d {args.hidden_units} x {args.num_blocks}")
    times, vectors = {k: [] for k in args.ways}, {}
    for _ in range(args.rounds):
        for name in args.ways:
            order, last_only = WAYS[name]
            start = time.perf_counter()
            vectors[name] = embed(model, data.items, ends, lengths, orders[order], last_only)
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name:14s} median {statistics.median(t):.2f} s  ({', '.join(f'{x:.2f}' for x in t)})")
    first = vectors[args.ways[0]]
    print(f"same vectors: {all(np.allclose(first, v, rtol=1e-4, atol=1e-5) for v in vectors.values())}")


if __name__ == "__main__":
    main()
