"""Training speed on CPU: seconds per epoch, users/s, start-up, peak memory, achieved GFLOP/s.

    python bench/train_speed.py                                   # Beauty, BCE and InfoNCE, pmixer's settings
    python bench/train_speed.py --pmixer ~/SASRec.pytorch/python  # + pmixer/SASRec.pytorch on the same data
    python bench/train_speed.py --pmixer ~/SASRec.pytorch/python --rounds 3   # in turn, 3 times: steadier ratios
    python bench/train_speed.py --losses infonce -- --hidden_units 256   # anything after -- goes to main.py
    git worktree add ../before HEAD~1 && python bench/train_speed.py --compare ../before --rounds 3   # A/B
    python bench/train_speed.py --ab "--amp bf16" --rounds 3 -- --hidden_units 256   # fp32 against bf16, in turn

Settings default to the reference PyTorch SASRec's (pmixer/SASRec.pytorch): maxlen 50, hidden 50,
2 blocks, 1 head, batch 128, on CPU. Each configuration runs in its own process, so start-up and peak
RSS are its own. Seconds per epoch is the median over --epochs epochs after one warm-up epoch.
Achieved GFLOP/s = the FLOPs torch executes in an epoch (forward + backward, counted by
torch.utils.flop_counter over one extra epoch) / the median epoch time, next to the fp32 and bf16 matmul rates
measured in the same process. pmixer is timed from its per-step log lines (first step of each epoch);
its code is run where it lies and never copied here.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PMIXER_SETTINGS = ["--maxlen", "50", "--hidden_units", "50", "--num_blocks", "2", "--num_heads", "1",
                   "--batch_size", "128"]


def matmul_gflops(size=2048, reps=10, dtype=None):
    import torch
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9


def child(argv, epochs, profile_steps=0):
    """Runs in its own process: prints one JSON line of measurements (and a profile table first)."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, ROOT)
    from cli import resolve_device
    from training import run
    run.keep_freed_memory()  # as main.main() does
    from config import build_config
    from dataset import TrainBatches
    from training import loop
    imported = time.time()
    config = build_config(argv)
    device = resolve_device(config.train.device)
    t = time.perf_counter()
    data, split = run.load_data(config)
    data_seconds = time.perf_counter() - t
    config, side = run.complete_config(config, data)
    model, loss, sampler, optimizer = run.build(config, side, split, device)
    batches = TrainBatches(split, config.model.maxlen, config.train.batch_size,
                           sampler=sampler if loss.per_position_negatives else None)
    next(iter(batches.epoch(np.random.default_rng(0))))  # the first batch is ready: training could start
    startup = time.time() - launched
    state, writer, stop = loop.LoopState(), loop.NullWriter(), loop.GracefulStop()
    step = loop.make_step(model, loss, sampler, config, device)
    seconds = []
    for _ in range(epochs + 1):
        _, _, s = loop.train_epoch(step, optimizer, batches, config, device, state, writer, stop)
        state.epoch, state.batch = state.epoch + 1, 0
        seconds.append(s)
    if profile_steps:  # after the epochs: caches (allocator, oneDNN kernels per shape) are warm, as in training
        print_profile(step, optimizer, batches, device, profile_steps)
    with FlopCounterMode(display=False) as counter:
        loop.train_epoch(step, optimizer, batches, config, device, state, writer, stop)
    epoch_s = statistics.median(seconds[1:])
    flops = counter.get_total_flops()
    rate, bf16_rate = matmul_gflops(), matmul_gflops(dtype=torch.bfloat16)
    print(json.dumps({"loss": config.loss.loss, "epoch_s": epoch_s, "epochs_s": seconds, "users_per_s":
                      len(batches.users) / epoch_s, "startup_s": startup, "import_s": imported - launched,
                      "data_s": data_seconds, "gflop_per_epoch": flops / 1e9, "achieved_gflops": flops / 1e9 / epoch_s,
                      "matmul_gflops": rate, "bf16_matmul_gflops": bf16_rate, "threads": torch.get_num_threads(),
                      "amp": config.train.amp}))


def print_profile(step, optimizer, batches, device, steps):
    """torch.profiler over `steps` training steps: where a step's time goes, by operator."""
    from torch.profiler import ProfilerActivity, profile, record_function
    step.train()
    batch_iter = batches.epoch(np.random.default_rng(1))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(os.environ.get("BENCH_SHAPES"))) as prof:
        for _ in range(steps):
            with record_function("## batch (numpy)"):
                batch = next(batch_iter).to(device)
            with record_function("## forward + loss"):
                loss = step(batch).loss
            with record_function("## backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("## optimizer"):
                optimizer.step()
    print(prof.key_averages(group_by_input_shape=bool(os.environ.get("BENCH_SHAPES"))).table(
        sort_by="self_cpu_time_total", row_limit=int(os.environ.get("BENCH_ROWS", 25))), file=sys.stderr)


def run_child(argv, epochs, profile=0, script=__file__):
    env = dict(os.environ, BENCH_LAUNCHED=repr(time.time()))
    proc = subprocess.Popen([sys.executable, script, "--child", "--epochs", str(epochs), "--profile",
                             str(profile), "--", *argv],
                            stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
    if status:
        raise SystemExit(f"error: training child failed (status {status}): {' '.join(argv)}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024}


def run_pmixer(path, data, epochs, settings):
    """pmixer/SASRec.pytorch's main.py on `data` (converted to its `user item` format in a temp dir)."""
    sys.path.insert(0, ROOT)
    from readers.logs import load_interactions
    log = load_interactions(data, cache_dir=os.path.join(ROOT, ".cache"))
    work = tempfile.mkdtemp(prefix="pmixer_bench_")
    os.makedirs(os.path.join(work, "data"))
    users = np.repeat(np.arange(1, log.num_users + 1), log.lengths)
    np.savetxt(os.path.join(work, "data", "bench.txt"), np.stack([users, log.items], 1), fmt="%d")
    flags = dict(zip(settings[::2], settings[1::2], strict=True))
    cmd = [sys.executable, "-u", os.path.join(path, "main.py"), "--dataset", "bench", "--train_dir", "bench",
           "--device", "cpu", "--num_epochs", str(epochs + 1), *[x for k, v in flags.items() for x in (k, v)]]
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = {}
    for line in proc.stdout:  # "loss in epoch E iteration S: ..." once per step
        found = re.match(r"loss in epoch (\d+) iteration 0:", line)
        if found:
            first_step[int(found[1])] = time.time()
    _, status, usage = os.wait4(proc.pid, 0)
    if status or len(first_step) < 3:
        raise SystemExit(f"error: pmixer run failed: {' '.join(cmd)} (in {work})")
    seconds = [first_step[e + 1] - first_step[e] for e in range(1, epochs + 1) if e + 1 in first_step]
    epoch_s = statistics.median(seconds[1:] or seconds)
    return {"epoch_s": epoch_s, "epochs_s": seconds, "startup_s": first_step[1] - launched,
            "peak_rss_mb": usage.ru_maxrss / 1024, "users_per_s": log.num_users / epoch_s}


PMIXER = "pmixer/SASRec.pytorch, bce"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "Beauty.txt"))
    p.add_argument("--losses", nargs="+", default=["bce", "infonce"])
    p.add_argument("--epochs", type=int, default=5, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--pmixer", help="folder of pmixer/SASRec.pytorch's python/main.py, to run beside")
    p.add_argument("--pmixer_epochs", type=int, default=4)
    p.add_argument("--compare", metavar="DIR", help="another checkout of this repository (e.g. a `git worktree` of an "
                   "older commit): its bench/train_speed.py runs each loss right after this one's, every round")
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in turn, and "
                   "report medians; the ratio to pmixer is taken within each round, so the machine's drift "
                   "between runs largely cancels")
    p.add_argument("--profile", type=int, default=0, help="print a torch.profiler table of N steps per run (after "
                   "the timed epochs; env BENCH_SHAPES=1 groups it by input shape, BENCH_ROWS=N sets its rows)")
    p.add_argument("--ab", metavar="FLAGS", help="each loss also with these main.py flags, in turn (quoted, e.g. "
                   "'--amp bf16' or '--encoder hstu')")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    if args.child:
        return child(extra, args.epochs, args.profile)
    base = ["--data", args.data, "--device", "cpu", "--dropout_rate", "0.2", *PMIXER_SETTINGS, *extra]
    runs = {f"this repo, {loss}": (base + ["--loss", loss], __file__) for loss in args.losses}
    if args.ab:
        runs = {name: run for loss in args.losses for name, run in (
            (f"this repo, {loss}", runs[f"this repo, {loss}"]),
            (f"this repo, {loss}, {args.ab}", (base + ["--loss", loss, *args.ab.split()], __file__)))}
    if args.compare:
        other = os.path.join(os.path.abspath(args.compare), "bench", "train_speed.py")
        runs = {name: run for loss in args.losses for name, run in (
            (f"this repo, {loss}", runs[f"this repo, {loss}"]),
            (f"{args.compare}, {loss}", (base + ["--loss", loss], other)))}
    results = {name: [] for name in [*runs, *([PMIXER] if args.pmixer else [])]}
    for round_ in range(args.rounds):
        for name, (argv, script) in runs.items():
            results[name].append(run_child(argv, args.epochs, args.profile if round_ == 0 else 0, script))
            print(json.dumps(results[name][-1]), flush=True)
        if args.pmixer:
            results[PMIXER].append(run_pmixer(args.pmixer, args.data, args.pmixer_epochs, PMIXER_SETTINGS))
            print(json.dumps(results[PMIXER][-1]), flush=True)
    print_table(results, args.compare)


def round_ratios(numerator, denominator):
    ratios = [a["epoch_s"] / b["epoch_s"] for a, b in zip(numerator, denominator, strict=True)]
    each = f" ({', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}x" + each


def print_table(results, compare=None):
    """One row per configuration: medians over rounds; a ratio is the median of the rounds' ratios."""
    reference = results.get(PMIXER)
    print("\n| run | s / epoch | users / s | start-up s | data load + split s | peak RSS MB | GFLOP / epoch | "
          "achieved GFLOP/s | matmul GFLOP/s fp32 / bf16 | pmixer s / epoch over this | s / epoch over --compare's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rounds in results.items():
        def cell(key, fmt, rounds=rounds):
            return format(statistics.median(r[key] for r in rounds), fmt) if key in rounds[0] else ""
        ratio = round_ratios(reference, rounds) if reference and name != PMIXER else ""
        mine = compare and name.startswith("this repo")
        other = results.get(name.replace("this repo", str(compare))) if mine else None
        versus = round_ratios(rounds, other) if other else ""
        print(f"| {name} | {cell('epoch_s', '.2f')} | {cell('users_per_s', ',.0f')} | {cell('startup_s', '.1f')} "
              f"| {cell('data_s', '.3f')} | {cell('peak_rss_mb', ',.0f')} | {cell('gflop_per_epoch', '.1f')} "
              f"| {cell('achieved_gflops', '.1f')} | {cell('matmul_gflops', '.0f')} / "
              f"{cell('bf16_matmul_gflops', '.0f')} | {ratio} | {versus} |")


if __name__ == "__main__":
    main()
