"""Memory at scale: a synthetic log of 20M interactions, parsed once, then trained from the cache.

    python bench/scale_memory.py                        # 20M interactions, 200 training steps
    python bench/scale_memory.py --interactions 2000000 --steps 50

Writes the log as a `user_id,item_id,timestamp` CSV (a real log's shape) under --work, then runs two
child processes and prints each one's peak resident memory (wait4's ru_maxrss) next to the file size:
  prepare  training/run.load_data: parse, index, write the cache (once per file)
  train    main.py's data path from the cache (memory-mapped arrays), the model, --steps training steps
and two reference rows: `baseline` (the imports alone) and `train, small log` (the same model and steps on
the embedded 58k-interaction synthetic log), so what the 20M log itself costs is the difference.
"""
import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, interactions, num_items, seed=0):
    """Users of geometric length (mean 50, >= 3) walking the catalogue in small steps: sequential structure."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    lengths = np.maximum(rng.geometric(1 / 50, size=interactions // 40), 3)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), interactions) + 1]
    lengths[-1] -= lengths.sum() - interactions
    lengths = lengths[lengths > 0]
    users = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    steps = rng.integers(-3, 8, size=interactions)
    starts = np.cumsum(lengths) - lengths
    steps[starts] = rng.integers(0, num_items, size=len(lengths))  # each user's first item
    walk = np.cumsum(steps) - np.repeat(np.cumsum(steps)[starts] - steps[starts], lengths)
    items = walk % num_items + 1
    time_ = 1_600_000_000 + np.arange(interactions) % 10_000_000
    tmp = path + ".tmp"
    pd.DataFrame({"user_id": users, "item_id": items, "timestamp": time_}).to_csv(tmp, index=False)
    os.replace(tmp, path)


def child(mode, path, cache, steps, num_items):
    import torch
    sys.path.insert(0, ROOT)
    from training import run
    run.keep_freed_memory()  # as main.main() does
    from config import build_config
    from dataset import TrainBatches
    from training import loop
    if mode == "baseline":  # what the imports alone hold
        return {}
    if mode == "train_small":  # same model size: the catalogue of the large log
        path = "synthetic"
    config = build_config(["--data", path, "--cache_dir", cache, "--device", "cpu", "--hidden_units", "64",
                            "--batch_size", "128"])
    start = time.perf_counter()
    data, split = run.load_data(config)
    out = {"load_s": time.perf_counter() - start, "users": data.num_users, "items": data.num_items,
           "interactions": int(data.offsets[-1])}
    if mode == "prepare":
        return out
    if mode == "train_small":  # a large log's catalogue (never fewer items than the small log's own ids)
        data.item_ids = np.arange(1, max(num_items, data.num_items) + 1).astype(str)
    config, side = run.complete_config(config, data)
    model, loss, sampler, optimizer = run.build(config, side, split, torch.device("cpu"))
    batches = TrainBatches(split, config.model.maxlen, config.train.batch_size, sampler=sampler)
    step = loop.make_step(model, loss, sampler, config, torch.device("cpu"))

    class FirstSteps:
        def __len__(self):
            return steps

        def epoch(self, rng):
            return itertools.islice(batches.epoch(rng), steps)

    _, seq_per_s, seconds = loop.train_epoch(step, optimizer, FirstSteps(), config, torch.device("cpu"),
                                              loop.LoopState(), loop.NullWriter(), loop.GracefulStop())
    return {**out, "train_steps": steps, "train_s": seconds, "seq_per_s": seq_per_s}


def run_child(mode, path, cache, steps, num_items):
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--log", path, "--cache", cache,
                             "--steps", str(steps), "--items", str(num_items)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"error: {mode} child failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=200, help="training steps timed and measured")
    p.add_argument("--work", default=os.path.join("/tmp", "sasrec_scale"), help="where the log and cache go")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "write":
        return write_log(args.log, args.interactions, args.items)
    if args.child:
        print(json.dumps(child(args.child, args.log, args.cache, args.steps, args.items)))
        return
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, f"synthetic_{args.interactions}.csv")
    if not os.path.exists(path):
        start = time.perf_counter()
        # In a child: a forked child's peak RSS (wait4) starts from its parent's, so the parent must stay small.
        subprocess.run([sys.executable, __file__, "--child", "write", "--log", path, "--interactions",
                        str(args.interactions), "--items", str(args.items)], check=True)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    cache = os.path.join(args.work, "cache")
    shutil.rmtree(cache, ignore_errors=True)  # `prepare` measures parsing, not a cache hit
    size_mb = os.path.getsize(path) / 2 ** 20
    print(f"log: {path}, {size_mb:,.0f} MB, {args.interactions:,} interactions")
    rows = [(mode, run_child(mode, path, cache, args.steps, args.items))
            for mode in ("baseline", "prepare", "train", "train_small")]
    print("\n| process | peak RSS MB | peak RSS / file size | seconds | sequences / s |")
    print("|---|---|---|---|---|")
    for mode, r in rows:
        seconds = r.get("train_s", r.get("load_s"))
        seq_s = f"{r['seq_per_s']:,.0f}" if "seq_per_s" in r else ""
        print(f"| {mode.replace('_small', ', small log')} | {r['peak_rss_mb']:,.0f} | "
              f"{r['peak_rss_mb'] / size_mb:.2f} | {'' if seconds is None else f'{seconds:.1f}'} | {seq_s} |")
    print(json.dumps(dict(rows)))


if __name__ == "__main__":
    main()
