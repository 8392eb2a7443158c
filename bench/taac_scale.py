"""Competition scale on CPU: prepare time and peak memory, training sequences/s, inference for every user.

    python bench/taac_scale.py --out /data/taac_1m              # 1M users, ~20M events, 500k items, mm 81 + 82
    python bench/taac_scale.py --out /tmp/taac_small --users 20000 --items 10000

Writes the synthetic folder once (taac_synthetic.py, 2026 parquet layout), then, each in a fresh process
so peak RSS is its own: (1) prepare = parse + cache + model build (training/run.prepare), first from the folder,
then again from the cache; (2) --steps training steps after --warmup steps (sequences/s, BCE as the
basemodel); (3) every training user embedded after their whole history, and the exact top-10 over the whole
catalogue (FAISS flat, inner product); (4) eval/competition.py on the predict users. Prints one line per
measurement; JSON of all of them with --json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_flags(args):
    return ["--data", os.path.join(args.out, "train"), "--mm_emb_id", *args.mm_emb_id, "--maxlen", "101",
            "--hidden_units", "32", "--num_blocks", "1", "--num_heads", "1", "--batch_size", str(args.batch_size),
            "--loss", "bce", "--positive_actions", "1", "2", "--time_features", "--device", "cpu",
            "--cache_dir", os.path.join(args.out, "cache")]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_prepare(args):
    import torch

    from config import build_config
    from training import run
    start = time.perf_counter()
    config, data, split, model, *_ = run.prepare(build_config(model_flags(args)), torch.device("cpu"))
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "users": data.num_users,
            "items": data.num_items, "events": int(len(data.items)),
            "parameters": sum(p.numel() for p in model.parameters())}


def stage_train(args):
    import numpy as np
    import torch

    from config import build_config
    from dataset import TrainBatches
    from training import run
    from training.loop import TrainStep, target_weights
    config, data, split, model, loss, sampler, optimizer = run.prepare(build_config(model_flags(args)),
                                                                        torch.device("cpu"))
    batches = TrainBatches(split, config.model.maxlen, config.train.batch_size,
                           sampler=sampler if loss.per_position_negatives else None,
                           target_weights=target_weights(config.loss, data))
    step, seqs, start = TrainStep(model, loss, sampler), 0, None
    model.train()
    for i, batch in enumerate(batches.epoch(np.random.default_rng(0))):
        if i == args.warmup:
            start, seqs = time.perf_counter(), 0
        out = step(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        seqs += batch.num_users
        if i + 1 == args.warmup + args.steps:
            break
    seconds = time.perf_counter() - start
    return {"steps": args.steps, "sequences_per_s": seqs / seconds, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def stage_infer(args):
    """Every training user's vector after the whole history, then the exact top-10 over all items."""
    import numpy as np
    import torch

    from config import build_config
    from eval.competition import whole_histories
    from eval.infer import build_index, choose_blas_kernel
    from eval.metrics import embed_users
    from training import run
    choose_blas_kernel()  # before faiss is first imported
    config, data, split, model, *_ = run.prepare(build_config(model_flags(args)), torch.device("cpu"))
    model.eval()
    start = time.perf_counter()
    vecs = embed_users(model, whole_histories(data), data.lengths, torch.device("cpu"))  # the competition's loop
    with torch.no_grad():
        items = model.item_embeddings(item_table=model.item_table()).numpy()[1:]
    embed_s = time.perf_counter() - start
    index = build_index(np.ascontiguousarray(items), "flat", "cpu", verbose=False)
    start = time.perf_counter()
    for s in range(0, len(vecs), 65536):
        index.search(vecs[s:s + 65536], 10)
    return {"users": int(len(vecs)), "embed_seconds": embed_s, "search_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb()}


STAGES = {"prepare": stage_prepare, "train": stage_train, "infer": stage_infer}


def run_stage(name, args):
    """A stage in its own process: its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--out", args.out, "--mm_emb_id",
           *args.mm_emb_id, "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
           str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"stage {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the synthetic data (written if absent) and its cache")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=500_000)
    p.add_argument("--mean_clicks", type=int, default=15, help="15 clicks + 40%% exposures: ~20 events per user")
    p.add_argument("--mm_emb_id", nargs="+", default=["81", "82"])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(STAGES[args.stage](args)))
        return
    figures = {}
    if not os.path.isdir(os.path.join(args.out, "train")):
        import taac_synthetic
        start = time.perf_counter()
        taac_synthetic.write(args.out, "parquet", args.users, args.items, mm_ids=tuple(args.mm_emb_id),
                             mean_clicks=args.mean_clicks)
        figures["generate_seconds"] = time.perf_counter() - start
        print(f"generate: {figures['generate_seconds']:.0f} s", flush=True)
    for name in ("prepare", "prepare_cached", "train", "infer"):
        figures[name] = run_stage("prepare" if name == "prepare_cached" else name, args)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures[name].items()), flush=True)
    start = time.perf_counter()
    last_run = os.path.join(args.out, "run")
    if os.path.isdir(os.path.join(last_run, "ckpt")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "eval", "competition.py"), "--ckpt",
                               os.path.join(last_run, "ckpt"), "--eval_data", os.path.join(args.out, "eval")],
                              capture_output=True, text=True, cwd=ROOT)
        figures["competition_seconds"] = time.perf_counter() - start
        print(done.stdout.strip().splitlines()[-2:] if done.returncode == 0 else done.stderr[-1000:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
