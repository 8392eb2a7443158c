"""Peak memory of one training step of a softmax loss (InfoNCE by default) on a dense batch (every position real).

    python bench/infonce_memory.py                       # B=256, L=200, chunked (default)
    python bench/infonce_memory.py --chunk_elems 0       # one unchunked (R x R) logits matrix
    python bench/infonce_memory.py --encoder hstu --num_blocks 8 --hidden_units 512 --num_heads 4 --maxlen 101 \
        --batch_size 128 --attn_bias position             # HSTU at the TAAC finalists' shape
    python bench/infonce_memory.py --num_items 500000 --loss "--loss sampled_softmax --similarity cosine \
        --in_batch_negatives --num_negatives 100000 --neg_sampler popularity --popularity_alpha 0.75"
                                                          # a mixed pool of 10^5 negatives + the batch's positives

Each setting runs in a fresh subprocess so ru_maxrss is that step's own peak resident memory.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_step(args):
    import numpy as np
    import torch

    from config import ModelConfig, build_config
    from dataset import Batch
    from model import SASRec
    from objectives import losses
    from objectives.samplers import NegativeSampler
    from training.loop import TrainStep

    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=args.num_items, maxlen=args.maxlen, hidden_units=args.hidden_units,
                               num_blocks=args.num_blocks, num_heads=args.num_heads, encoder=args.encoder,
                               attn_bias=args.attn_bias))
    seq, pos, neg = (torch.randint(1, args.num_items + 1, (args.batch_size, args.maxlen)) for _ in range(3))
    rows = args.batch_size * args.maxlen
    losses.SOFTMAX_CHUNK_ELEMS = args.chunk_elems or rows * rows
    loss_config = build_config(["--temperature", "0.1", *args.loss.split()]).loss
    counts = np.random.default_rng(0).zipf(1.5, args.num_items + 1) % 10_000  # a long tail, as real logs have
    loss_fn = losses.build_loss(loss_config, counts)
    popular = loss_config.neg_sampler == "popularity" and loss_config.loss == "sampled_softmax"
    step = TrainStep(model, loss_fn, NegativeSampler(args.num_items, losses.popularity(
        counts, loss_config.popularity_alpha) if popular else None))
    batch = Batch(seq, pos, torch.arange(args.batch_size), torch.arange(rows), neg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = step(batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.loss}; {args.encoder} x {args.num_blocks}, d {args.hidden_units}, {args.num_heads} heads, bias "
          f"{args.attn_bias or 'none'}; B={args.batch_size} L={args.maxlen} R={rows} rows, "
          f"chunk_elems={losses.SOFTMAX_CHUNK_ELEMS}: "
          f"peak RSS {peak / 1024:.0f} MB (model and inputs before the step {base / 1024:.0f} MB), "
          f"step {seconds:.1f}s, loss {loss.item():.4f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--maxlen", type=int, default=200)
    p.add_argument("--hidden_units", type=int, default=64)
    p.add_argument("--num_blocks", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=1)
    p.add_argument("--encoder", default="sasrec", choices=("sasrec", "hstu"))
    p.add_argument("--attn_bias", default="", help="position (time needs timestamps, which this batch has not)")
    p.add_argument("--num_items", type=int, default=50000)
    p.add_argument("--loss", default="--use_infonce", help="main.py's loss flags, in one string")
    p.add_argument("--chunk_elems", type=int, default=None,
                   help="logits per chunk; 0 = unchunked (default: objectives/losses.py's)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.chunk_elems is None:
            from objectives import losses
            args.chunk_elems = losses.SOFTMAX_CHUNK_ELEMS
        one_step(args)
        return
    subprocess.run([sys.executable, __file__, "--child"] + sys.argv[1:], check=True)


if __name__ == "__main__":
    main()
