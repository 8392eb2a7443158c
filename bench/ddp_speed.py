"""Sequences per second for one process against torchrun with N CPU processes, on the same data.

    python bench/ddp_speed.py                       # Beauty, pmixer's settings, bce and infonce
    python bench/ddp_speed.py --data ../shared/data/Toys.txt --losses infonce -- --hidden_units 256
    python bench/ddp_speed.py --rows one_thread same_batch      # two of the rows

Each configuration trains --epochs epochs through main.py (validation only after the last) and reports
the median training throughput of epochs 2.. from its train.log. Rows (--rows: which):
  threads       1 process, all threads           the usual single-process run
  one_thread    1 process x 1 thread             what one rank below does
  torchrun      torchrun N x 1 thread, batch B   N ranks, each B per step: a global batch of N x B
  same_batch    torchrun N x 1 thread, batch B/N the same global batch as one process (the same optimisation)
  gather        the same with --gather_negatives (infonce and sampled_softmax only)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("threads", "one_thread", "torchrun", "same_batch", "gather")
SETTINGS = ["--maxlen", "50", "--hidden_units", "50", "--num_blocks", "2", "--num_heads", "1", "--dropout_rate", "0.2"]


def run(launcher, flags, threads, epochs):
    run_dir = tempfile.mkdtemp(prefix="ddp_speed_")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [*launcher, os.path.join(ROOT, "main.py"), *flags, "--num_epochs", str(epochs), "--eval_every", "1000",
           "--run_dir", os.path.join(run_dir, "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(run_dir, "run", "logs", "train.log")) as f:
        epochs_log = [json.loads(line) for line in f]
    return statistics.median(e["seq_per_s"] for e in epochs_log[1:]), epochs_log[-1]["loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "Beauty.txt"))
    p.add_argument("--losses", nargs="+", default=["bce", "infonce"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 2: the first is not timed)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which configurations to run")
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (throughput is the median of epochs 2..)")
    python, n, b = [sys.executable], args.nproc, args.batch_size
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    print("| loss | run | sequences / s | last epoch's loss |\n|---|---|---|---|")
    for loss in args.losses:
        base = ["--data", args.data, "--device", "cpu", "--loss", loss, *SETTINGS, *extra]
        rows = {"threads": ("1 process, all threads", python, base + ["--batch_size", str(b)], None),
                "one_thread": ("1 process x 1 thread", python, base + ["--batch_size", str(b)], 1),
                "torchrun": (f"torchrun {n} x 1 thread, batch {b} each", torchrun, base + ["--batch_size", str(b)], 1),
                "same_batch": (f"torchrun {n} x 1 thread, batch {b // n} each", torchrun,
                               base + ["--batch_size", str(b // n)], 1)}
        if loss in ("infonce", "sampled_softmax"):
            rows["gather"] = (f"torchrun {n} x 1 thread, batch {b // n} each, --gather_negatives", torchrun,
                              base + ["--batch_size", str(b // n), "--gather_negatives"], 1)
        for name, launcher, flags, threads in (rows[key] for key in ROWS if key in rows and key in args.rows):
            seq_s, last_loss = run(launcher, flags, threads, args.epochs)
            print(f"| {loss} | {name} | {seq_s:,.0f} | {last_loss:.4f} |", flush=True)


if __name__ == "__main__":
    main()
