"""Quality of the default recipe, every loss and every option, on the real datasets: a markdown table.

    python bench/quality.py --jobs 2                              # the whole grid, two runs at a time
    python bench/quality.py --datasets beauty toys --variants default symmetric queue --seeds 42 43 --jobs 2
    python bench/quality.py --table_only                          # rebuild the table from finished runs
    python bench/quality.py --data_dir DIR --datasets lastfm --variants default --seeds 42 -- --num_epochs 1

Each run is `python main.py --config configs/default.toml --data <file> --seed S <the variant's flags>`
(the one recipe: only the data and the variant change), in its own process so its peak memory is its
own. With --jobs N > 1 the runs go N at a time with OMP_NUM_THREADS=1 each: two default-threaded torch
processes on 2 cores slow each other many-fold (OpenMP spin-waiting), so their minutes are 1-thread
minutes. Finished runs (their results.json) are reused unless --rerun. Rows give the mean over seeds and
the difference from the default recipe on the same data; the table goes to stdout and to --out.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
DATASETS = {"beauty": "Beauty.txt", "toys": "Toys_and_Games.txt", "lastfm": "LastFM.txt", "games": "Games.txt",
            "ml100k": "ml-100k.inter"}  # file names
NAMES = {"beauty": "Beauty", "toys": "Toys", "lastfm": "LastFM", "games": "Games", "ml100k": "ml-100k"}
# Best published full-ranking (leave-one-out, all items ranked) results for a plain SASRec on the same
# files: eSASRec (Tikhonovich et al., RecSys 2025), README table of blondered/transformer_benchmark,
# column SASRec+SS (sampled softmax, 256 negatives). LastFM has no such figure that we could cite; Games'
# SASRec-paper figure ranks the target against 100 sampled negatives (our sampled_* metrics).
PUBLISHED = {
    "beauty": ("0.0921", "0.0531", "eSASRec table, SASRec+SS"),
    "toys": ("0.0970", "0.0580", "eSASRec table, SASRec+SS"),
    "lastfm": ("", "", "no full-ranking SASRec figure found"),
    "games": ("0.7410*", "0.5360*", "SASRec paper (Kang & McAuley 2018), *100 sampled negatives"),
    "ml100k": ("", "", "timestamps: the time attention bias applies"),
}
# The variants: flags added to the recipe. {attributes}: the dataset's item attribute file.
VARIANTS = {
    "default": [],
    "bce": ["--loss", "bce"],
    "gbce": ["--loss", "gbce"],
    "sampled_softmax": ["--loss", "sampled_softmax", "--similarity", "cosine", "--num_negatives", "2048"],
    "per_position": ["--loss", "sampled_softmax", "--negatives_per_position", "--num_negatives", "256",
                     "--similarity", "cosine"],
    "ce": ["--loss", "ce"],
    "symmetric": ["--symmetric"],
    "queue": ["--negative_queue", "8192"],
    "augment": ["--augment", "0.1"],
    "align": ["--align_side_info", "0.1", "--item_features", "{attributes}"],
    "schedule": ["--loss_schedule", "bce:10,infonce"],
    "item_dropout": ["--item_emb_dropout", "0.2"],
    "random_batches": ["--bucket_batches", "1"],
    "batch_loss": ["--loss_reduction", "batch"],  # the recipe before position weighting
    "no_ema": ["--ema_decay", "0"],  # the recipe before weight averaging
    "bf16": ["--amp", "bf16"],  # the encoder and the softmax pool's matmuls in bf16 (the recipe's default)
    "fp32": ["--amp", "none"],  # the recipe before bf16
    "position": ["--attn_bias", "position"],  # relative position bias in every SASRec block
    "time": ["--attn_bias", "position,time"],  # + the time bias (logs with timestamps)
    "hstu": ["--encoder", "hstu"],
    "hstu_position": ["--encoder", "hstu", "--attn_bias", "position"],
    "hstu_time": ["--encoder", "hstu", "--attn_bias", "position,time"],
    "time_features": ["--time_features"],  # gaps embedded into the tokens (logs with timestamps)
    "time_features_time": ["--time_features", "--attn_bias", "position,time"],  # both ways of seeing time
    # ml-100k's ratings as actions: 4-5 a click (the targets, and the users evaluated), 1-3 an exposure
    "actions": ["--action_col", "rating", "--action_threshold", "4", "--positive_actions", "1", "--eval_actions", "1"],
    "next_action": ["--action_col", "rating", "--action_threshold", "4", "--positive_actions", "1", "--eval_actions",
                    "1", "--next_action"],
    # every rating a target (exposures too), evaluated on clicks; with --next_action each position is told
    # whether its target is a click, and validation / test ask for one
    "all_targets": ["--action_col", "rating", "--action_threshold", "4", "--eval_actions", "1"],
    "next_action_all": ["--action_col", "rating", "--action_threshold", "4", "--eval_actions", "1", "--next_action"],
    "muon": ["--optimizer", "muon"],
    # in-batch positives + 2048 negatives drawn by count^0.75, logQ-corrected for both sources
    "mixed": ["--loss", "sampled_softmax", "--similarity", "cosine", "--in_batch_negatives", "--num_negatives", "2048",
              "--neg_sampler", "popularity", "--popularity_alpha", "0.75"],
    "hard_curriculum": ["--hard_negatives", "2048", "--hard_negatives_to", "256", "--hard_negatives_steps", "3000"],
}
VARIANTS["together"] = VARIANTS["muon"] + VARIANTS["mixed"] + VARIANTS["hard_curriculum"]  # the three at once


def data_flags(dataset, data_dir=DATA):
    path = os.path.join(data_dir, DATASETS[dataset])
    return ["--data", path] + (["--data_format", "pairs", "--sampled_metrics"] if dataset == "games" else [])


def variant_flags(variant, dataset, data_dir=DATA):
    attributes = os.path.join(data_dir, f"{DATASETS[dataset].split('.')[0]}_item2attributes.json")
    return [a.format(attributes=attributes) for a in VARIANTS[variant]]


def run_one(job, jobs, extra, data_dir=DATA):
    """Train one (dataset, variant, seed) in a child process; record its minutes and peak RSS."""
    dataset, variant, seed, run_dir = job
    shutil.rmtree(run_dir, ignore_errors=True)  # an old or unfinished run starts over
    os.makedirs(run_dir)
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config", os.path.join(ROOT, "configs", "default.toml"),
           *data_flags(dataset, data_dir), "--seed", str(seed), "--run_dir", run_dir,
           *variant_flags(variant, dataset, data_dir), *extra]
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if jobs > 1 else {}))
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        print(f"error: {dataset}/{variant}/seed {seed} failed; see {os.path.join(run_dir, 'stdout.txt')}", flush=True)
        return
    results = os.path.join(run_dir, "results.json")
    with open(results) as f:
        r = json.load(f)
    r["bench"] = {"minutes": (time.perf_counter() - start) / 60, "peak_mb": usage.ru_maxrss / 1024,
                  "threads": env.get("OMP_NUM_THREADS", "default")}
    with open(results + ".tmp", "w") as f:
        json.dump(r, f, indent=2)
    os.replace(results + ".tmp", results)


def summary(run_dirs):
    """Mean over the finished seeds: valid / test NDCG@10, test HR@10, minutes, seeds; None if none finished."""
    done = []
    for d in run_dirs:
        if os.path.exists(os.path.join(d, "results.json")):
            with open(os.path.join(d, "results.json")) as f:
                done.append(json.load(f))
    if not done:
        return None
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"valid": mean([r["valid"]["NDCG@10"] for r in done]),
            "HR@10": mean([r["test"]["HR@10"] for r in done]), "NDCG@10": mean([r["test"]["NDCG@10"] for r in done]),
            "sampled": mean([r["test"].get("sampled_NDCG@10", 0.0) for r in done]),
            "epochs": mean([r.get("best_epoch", 0) for r in done]),
            "minutes": mean([r.get("bench", {}).get("minutes", 0.0) for r in done]), "seeds": len(done),
            "threads": done[0].get("bench", {}).get("threads", "")}


def table(cells, datasets, variants):
    lines = ["| data | variant | seeds | valid NDCG@10 | test HR@10 | test NDCG@10 | vs default (valid / test) "
             "| best epoch | minutes | published HR@10 / NDCG@10 |", "|---" * 10 + "|"]
    for dataset in datasets:
        base = cells.get((dataset, "default"))
        for variant in variants:
            c = cells.get((dataset, variant))
            if c is None:
                continue
            delta = (f"{c['valid'] - base['valid']:+.4f} / {c['NDCG@10'] - base['NDCG@10']:+.4f}"
                     if base and variant != "default" else "")
            hr, ndcg, source = PUBLISHED[dataset]
            sampled = f" (sampled {c['sampled']:.4f})" if dataset == "games" else ""
            lines.append(f"| {NAMES[dataset]} | {variant} | {c['seeds']} | {c['valid']:.4f} | {c['HR@10']:.4f} | "
                         f"{c['NDCG@10']:.4f}{sampled} | {delta} | {c['epochs']:.0f} | {c['minutes']:.1f} "
                         f"({c['threads']} thr) | {f'{hr} / {ndcg} ({source})' if hr else source} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    p.add_argument("--data_dir", default=DATA, help="folder of the dataset files (Beauty.txt, LastFM.txt, ... and "
                   "their _item2attributes.json)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one thread when > 1)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "quality"), help="one folder per run")
    p.add_argument("--out", default=None, help="markdown file (default: <runs>/quality.md)")
    p.add_argument("--rerun", action="store_true", help="train again even where results.json exists")
    p.add_argument("--table_only", action="store_true", help="only tabulate finished runs")
    args, extra = p.parse_known_args()  # anything else goes to every main.py run
    extra = [x for x in extra if x != "--"]
    folder = lambda d, v, s: os.path.join(args.runs, f"{d}-{v}-s{s}")  # noqa: E731
    grid = [(d, v, s, folder(d, v, s)) for d in args.datasets for v in args.variants for s in args.seeds]
    todo = [job for job in grid if not args.table_only
            and (args.rerun or not os.path.exists(os.path.join(job[3], "results.json")))]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on their child processes
        list(pool.map(lambda job: run_one(job, args.jobs, extra, args.data_dir), todo))
    cells = {(d, v): summary([folder(d, v, s) for s in args.seeds]) for d in args.datasets for v in args.variants}
    text = table({k: c for k, c in cells.items() if c}, args.datasets, args.variants)
    print(text)
    out = args.out or os.path.join(args.runs, "quality.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(out + ".tmp", out)
    print(f"table written to {out}")


if __name__ == "__main__":
    main()
