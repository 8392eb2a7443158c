"""Quality of every loss on the real datasets, next to published numbers: a markdown table.

    python bench/quality.py                                   # every loss x Beauty, Toys, LastFM, Games
    python bench/quality.py --datasets beauty --losses sampled_softmax infonce
    python bench/quality.py --table_only                      # rebuild the table from finished runs

Each run is `python main.py --config configs/<dataset>.toml --loss <loss>` (the shipped, tuned
settings; its [<loss>] table applies), in its own process so its peak memory is its own. Finished
runs (their results.json) are reused unless --rerun. The table goes to stdout and to --out.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from losses import LOSSES  # noqa: E402

DATASETS = {"beauty": "Beauty", "toys": "Toys", "lastfm": "LastFM", "games": "Games"}
# Best published full-ranking (leave-one-out, all items ranked) results for a plain SASRec on the
# same files: eSASRec (Tikhonovich et al., RecSys 2025), README table of blondered/transformer_benchmark,
# column SASRec+SS (sampled softmax, 256 negatives). LastFM and Games have no such full-ranking figure
# for plain SASRec that we could cite; Games' SASRec-paper figure uses 100 sampled negatives.
PUBLISHED = {
    "beauty": ("0.0921", "0.0531", "eSASRec table, SASRec+SS"),
    "toys": ("0.0970", "0.0580", "eSASRec table, SASRec+SS"),
    "lastfm": ("", "", "no full-ranking SASRec figure found"),
    "games": ("0.7410*", "0.5360*", "SASRec paper (Kang & McAuley 2018), *100 sampled negatives"),
}


def run_one(dataset, loss, run_dir, extra):
    """Train one (dataset, loss); return (minutes, peak RSS MB) of the child process."""
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config", os.path.join(ROOT, "configs", f"{dataset}.toml"),
           "--loss", loss, "--run_dir", run_dir] + extra
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(run_dir, "stdout.txt"), "w"), stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    minutes = (time.perf_counter() - start) / 60
    if status != 0:
        raise SystemExit(f"error: {dataset}/{loss} failed; see {os.path.join(run_dir, 'stdout.txt')}")
    return minutes, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def row(dataset, loss, run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        r = json.load(f)
    bench = r.get("bench", {})
    test = r["test"]
    sampled = "sampled_NDCG@10" in test
    return {"dataset": DATASETS[dataset], "loss": loss, "HR@10": test["HR@10"], "NDCG@10": test["NDCG@10"],
            "pop NDCG@10": r["popularity_test"]["NDCG@10"],
            "sampled": f"{test['sampled_HR@10']:.4f} / {test['sampled_NDCG@10']:.4f}" if sampled else "",
            "best epoch": r.get("best_epoch", ""), "minutes": bench.get("minutes", r.get("train_minutes", 0)),
            "peak MB": bench.get("peak_mb")}


def table(rows):
    lines = ["| data | loss | HR@10 | NDCG@10 | popularity NDCG@10 | sampled HR@10 / NDCG@10 | best epoch | minutes "
             "| peak RSS MB | published HR@10 / NDCG@10 |", "|---" * 10 + "|"]
    for r in rows:
        key = next(k for k, v in DATASETS.items() if v == r["dataset"])
        hr, ndcg, source = PUBLISHED[key]
        published = f"{hr} / {ndcg} ({source})" if hr else source
        peak = f"{r['peak MB']:.0f}" if r["peak MB"] else ""
        lines.append(f"| {r['dataset']} | {r['loss']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['pop NDCG@10']:.4f} "
                     f"| {r['sampled']} | {r['best epoch']} | {r['minutes']:.1f} | {peak} | {published} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "quality"), help="one run folder per (dataset, loss)")
    p.add_argument("--out", default=None, help="markdown file (default: <runs>/quality.md)")
    p.add_argument("--rerun", action="store_true", help="train again even where results.json exists")
    p.add_argument("--table_only", action="store_true", help="only tabulate finished runs")
    args, extra = p.parse_known_args()  # anything else goes to main.py, e.g. --data_dir-style overrides
    rows = []
    for dataset in args.datasets:
        for loss in args.losses:
            run_dir = os.path.join(args.runs, f"{dataset}_{loss}")
            results = os.path.join(run_dir, "results.json")
            if not args.table_only and (args.rerun or not os.path.exists(results)):
                shutil.rmtree(run_dir, ignore_errors=True)  # an old or unfinished run starts over
                os.makedirs(run_dir)
                minutes, peak_mb = run_one(dataset, loss, run_dir, extra)
                with open(results) as f:
                    r = json.load(f)
                r["bench"] = {"minutes": minutes, "peak_mb": peak_mb}
                with open(results + ".tmp", "w") as f:
                    json.dump(r, f, indent=2)
                os.replace(results + ".tmp", results)
            if os.path.exists(results):
                rows.append(row(dataset, loss, run_dir))
    text = table(rows)
    print(text)
    out = args.out or os.path.join(args.runs, "quality.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(f"table written to {out}")


if __name__ == "__main__":
    main()
