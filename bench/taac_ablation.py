"""Each feature family's ablation on the planted synthetic competition data, over seeds.

    python bench/taac_ablation.py --users 20000 --items 10000 --seeds 0 1 --jobs 2

Writes one synthetic folder per seed (taac_synthetic.py), trains the full model and one model without each
family (user features, item features, multimodal vectors, action types, time features) plus the user
features added to the states instead of a token, and prints the mean validation and test competition
score per variant beside the full model's. `--variants` also takes the encoder variants (ENCODERS: HSTU and
`--attn_bias position,time` on the full model, and the biases without `--time_features`) and the competition
techniques (TECHNIQUES: next action, mixed negatives, semantic ids, Muon, a hard-negative curriculum,
together; and, for creatives training never saw, towers without item ids or with item id dropout). --jobs N
runs N trainings at a time, each with one thread (OMP_NUM_THREADS=1): two default-threaded runs on 2 cores slow
each other by up to 30x.

    python bench/taac_ablation.py --out DIR --cold_items 0.1 --variants full "semantic ids"

--cold_items F writes folders whose training lacks a fraction F of the creatives (taac_synthetic.py
--cold_items) and a tenth as many users to predict; every run then also goes through eval/competition.py on the
evaluation folder, and the table adds its competition score on all predicted users, on those whose hidden click
is a creative training never saw, and on the others.
"""
import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = ["--mm_emb_id", "81", "--positive_actions", "1", "2", "--time_features", "--user_feature_ids", "103", "106"]
VARIANTS = {  # each removes one family from the full model (user features: the two that carry signal)
    "full": FULL,
    "without user features": FULL + ["--user_features", "none"],
    "user features added to the states": FULL + ["--user_features", "add"],
    "all 8 user features (6 are noise)": [f for f in FULL if f not in ("--user_feature_ids", "103", "106")],
    "without item features": FULL + ["--item_feature_ids"],
    "without multimodal vectors": FULL[2:],
    "without action types": ["--mm_emb_id", "81", "--time_features", "--user_feature_ids", "103", "106",
                             "--no-action_emb"],
    "without time features": [f for f in FULL if f != "--time_features"],
}
BIASES = ["--attn_bias", "position,time"]
ENCODERS = {  # the encoder issue's grid on the full model (SASRec), and the biases with and without time features
    "HSTU": FULL + ["--encoder", "hstu"],
    "SASRec + biases": FULL + BIASES,
    "HSTU + biases": FULL + ["--encoder", "hstu"] + BIASES,
    "SASRec + biases, without time features": VARIANTS["without time features"] + BIASES,
}
MIXED = ["--loss", "sampled_softmax", "--similarity", "cosine", "--in_batch_negatives", "--num_negatives", "4096",
         "--neg_sampler", "popularity", "--popularity_alpha", "0.75"]
TECHNIQUES = {  # the competition techniques, each alone on the full model, then together
    "next action": FULL + ["--next_action"],  # clicks and conversions are the targets: told which one
    "next action, every event a target": [f for f in FULL if f not in ("--positive_actions", "1", "2")]
    + ["--next_action"],  # exposures are targets too, each position told its target's action; asked for a click
    "mixed negatives": FULL + MIXED,
    "semantic ids": FULL + ["--semantic_ids", "2", "64"],
    "Muon": FULL + ["--optimizer", "muon"],
    "hard-negative curriculum": FULL + ["--hard_negatives", "1024", "--hard_negatives_to", "128",
                                        "--hard_negatives_steps", "2000"],
    "together": FULL + ["--next_action", "--semantic_ids", "2", "64", "--optimizer", "muon"] + MIXED,
    # items from their features and vectors alone: a creative training never saw is embedded as the others are
    "without item ids": FULL + ["--no_item_id"],
    "semantic ids, without item ids": FULL + ["--semantic_ids", "2", "64", "--no_item_id"],
    # ids kept, and a fifth of them removed each step: the tower learns what an item without one looks like
    "item id dropout": FULL + ["--item_id_dropout", "0.2"],
    "semantic ids, item id dropout": FULL + ["--semantic_ids", "2", "64", "--item_id_dropout", "0.2"],
}
ALL = {**VARIANTS, **ENCODERS, **TECHNIQUES}


def train(args, seed, name, flags):
    run_dir = os.path.join(args.out, f"seed{seed}", name.replace(" ", "_"))
    results = os.path.join(run_dir, "results.json")
    if not os.path.exists(results):
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier run: start it again
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--data", os.path.join(args.out, f"seed{seed}", "train"),
               "--seed", str(seed), "--run_dir", run_dir, "--cache_dir", os.path.join(args.out, "cache"),
               *([] if "--loss" in flags else ["--use_infonce"]), "--keep_history", "--eval_actions", "1", "2",
               "--device", "cpu", *args.flags, *flags]
        env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"{name} (seed {seed}) failed: {done.stderr.strip()[-500:]}")
    with open(results) as f:
        r = json.load(f)
    row = [name, seed, r["valid"]["score"], r["test"]["score"], r["test"]["NDCG@10"]]
    return row + (cold_scores(args, seed, run_dir) if args.cold_items else [])


def cold_scores(args, seed, run_dir):
    """eval/competition.py on the seed's evaluation folder; its competition score on all predicted users, on those
    whose hidden click is a creative training never saw (eval/cold.json), and on the others."""
    from eval.competition import competition_score
    eval_dir, out = os.path.join(args.out, f"seed{seed}", "eval"), os.path.join(run_dir, "competition")
    if not os.path.exists(os.path.join(out, "result.json")):
        env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
        done = subprocess.run([sys.executable, os.path.join(ROOT, "eval", "competition.py"), "--ckpt",
                               os.path.join(run_dir, "ckpt"), "--eval_data", eval_dir, "--out", out, "--device", "cpu"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"competition inference of {run_dir} failed: {done.stderr.strip()[-500:]}")
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(eval_dir, "truth.json")) as f:
        truth = {str(u): int(c) for u, c in json.load(f).items()}
    with open(os.path.join(eval_dir, "cold.json")) as f:
        cold = set(json.load(f))
    score = lambda keep: competition_score(result["top10s"], result["user"],  # noqa: E731
                                           {u: c for u, c in truth.items() if keep(c)})["score"]
    return [score(lambda c: True), score(lambda c: c in cold), score(lambda c: c not in cold)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "taac_ablation"))
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=sorted(ALL), default=list(VARIANTS))
    p.add_argument("--cold_items", type=float, default=0.0, help="fraction of creatives withheld from training; "
                   "adds the competition score on the evaluation folder, cold and warm targets apart")
    p.add_argument("flags", nargs="*", default=["--maxlen", "50", "--hidden_units", "48", "--num_blocks", "2",
                                                "--batch_size", "128", "--num_epochs", "40", "--eval_every", "2",
                                                "--patience", "6"],
                   help="training flags after --, shared by every variant")
    args = p.parse_args(argv)
    import taac_synthetic
    for seed in args.seeds:
        folder = os.path.join(args.out, f"seed{seed}")
        if not os.path.isdir(os.path.join(folder, "train")):
            taac_synthetic.write(folder, "parquet", args.users, args.items, seed=seed, cold_items=args.cold_items,
                                 predict_users=None if args.cold_items else 10)
        if bool(args.cold_items) != os.path.exists(os.path.join(folder, "eval", "cold.json")):
            raise SystemExit(f"--out {args.out}: {folder} was written {'without' if args.cold_items else 'with'} "
                             "--cold_items; give another --out")
    jobs = list(itertools.product(args.seeds, args.variants))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: train(args, job[0], job[1], ALL[job[1]]), jobs))
    by_name = {name: [r for r in rows if r[0] == name] for name in args.variants}
    full_test = statistics.mean(r[3] for r in by_name.get("full", rows))
    print(f"\n{args.users} users, {args.items} items, seeds {args.seeds}; flags {' '.join(args.flags)}\n")
    cold = " | competition score: all / cold / warm targets" if args.cold_items else ""
    print(f"| variant | valid score | test score | test NDCG@10 | test score - full{cold} |")
    print("|---|---|---|---|---|" + ("---|" if cold else ""))
    for name, rs in by_name.items():
        valid, test, ndcg, *scores = (statistics.mean(r[i] for r in rs) for i in range(2, len(rs[0])))
        extra = f" {' / '.join(f'{x:.4f}' for x in scores)} |" if scores else ""
        print(f"| {name} | {valid:.4f} | {test:.4f} | {ndcg:.4f} | {test - full_test:+.4f} |{extra}")


if __name__ == "__main__":
    main()
