"""Speed beside the official TAAC 2025 baseline, on the same synthetic competition data, on CPU.

Why: the baseline (TencentAdvertisingAlgorithmCompetition/baseline_2025) builds every batch in Python, one
feature dict per position, and its model turns those dicts into tensors inside forward; this repository
builds id batches with numpy and looks features up from tensors. This measures both halves side by side:

1. data loading: batches/s of the baseline's MyDataset + DataLoader (collate_fn=dataset.collate_fn) against
   this repository's dataset.TrainBatches, over --batches batches after one warm-up batch;
2. training: sequences/s of one training step, timed around the step only (batches are drawn outside the
   timing): the baseline's BaselineModel forward, BCE on its positive / negative logits at the positions
   whose next token is an item, backward and Adam step, as its main.py does; against this repository's
   loop.TrainStep + backward + its optimizer's step, over --steps steps after --warmup_steps.

    python bench/baseline_speed.py --baseline ~/baseline_2025                     # synthetic data, 3 rounds
    python bench/baseline_speed.py --baseline ~/baseline_2025 --data DIR/train   # a competition folder
    python bench/baseline_speed.py --baseline ~/baseline_2025 --num_workers 0 1 --threads 2 --rounds 5
    python bench/baseline_speed.py --baseline ~/baseline_2025 -- --loss infonce  # after --: this repo's flags

--baseline is a checkout of that repository; only its dataset.py and model.py are used, imported from
there at run time and never copied here (its licence is CC BY-NC). From a mirror whose large files are
absent: `mkdir DIR && git -C MIRROR archive HEAD dataset.py model.py | tar -x -C DIR`. Without --data a
synthetic folder is written by taac_synthetic.write into a temporary folder (the 2026 parquet layout: seq/,
item_feat/, user_feat/, mm_emb/emb_81_32_parquet/, indexer.pkl; not cached by this repo), removed at the
end. It needs --users <= --items: the baseline looks each user token's re-id up among the items'.

Each side runs in its own long-lived process (both repositories have a dataset.py and a model.py, and
neither side's objects or allocator should weigh on the other), set up once; the parent then asks them in
turn, A, B, A, B, ..., each round: loading (baseline, then this repo, once per --num_workers value), then
training (baseline, then this repo). The machine drifts, so the table gives medians over rounds, and each
ratio is the median of the per-round ratios of neighbouring measurements. Both processes use the same
torch thread count (--threads, default torch's); DataLoader workers run one thread each (torch's default).
The baseline's training batches come from a DataLoader without workers, so no loader competes with its step.
A side whose epoch has fewer than warm-up + timed batches starts another epoch inside the timing.
"""
import argparse
import gc
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE, OURS = "baseline", "ours"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, metavar="DIR", help="checkout of baseline_2025 (dataset.py, model.py)")
    p.add_argument("--data", metavar="DIR", help="competition training folder (default: write a synthetic one)")
    p.add_argument("--users", type=int, default=10000, help="synthetic data: training users (at most --items)")
    p.add_argument("--items", type=int, default=20000, help="synthetic data: items")
    p.add_argument("--seed", type=int, default=0, help="synthetic data: seed")
    p.add_argument("--ours_data", metavar="DATA", help="what this repository reads instead of the same folder, e.g. "
                   "'synthetic' (its embedded log; then not the same data, and no --mm_emb_id)")
    p.add_argument("--batch_size", type=int, default=128,
                   help="sequences per batch, both sides (the baseline's main.py: 2048)")
    p.add_argument("--maxlen", type=int, default=101)
    p.add_argument("--hidden_units", type=int, default=32)
    p.add_argument("--num_blocks", type=int, default=1)
    p.add_argument("--num_heads", type=int, default=1)
    p.add_argument("--dropout_rate", type=float, default=0.2)
    p.add_argument("--norm_first", action=argparse.BooleanOptionalAction, default=False,
                   help="pre-norm blocks on both sides (default: post-norm, the baseline's default)")
    p.add_argument("--mm_emb_id", nargs="+", default=["81"], help="multimodal feature ids, both sides")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0],
                   help="baseline DataLoader workers; one loading measurement per value, e.g. 0 1")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in both processes (default: torch's)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per loading measurement")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed training steps before each measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve", choices=(BASELINE, OURS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.ours_extra = argv[cut + 1:]
    if args.serve is None and min(args.batches, args.steps, args.rounds, args.batch_size) < 1:
        p.error("--batches, --steps, --rounds and --batch_size must be >= 1")
    if args.serve is None and not args.data and args.users > args.items:
        p.error(f"--users {args.users} > --items {args.items}: the baseline's fill_missing_feat looks each user "
                f"token's re-id up among the items' (KeyError once a user re-id exceeds the item count)")
    return args


# ----------------------------------------------------------------------------- the parent: rounds and table

def ours_argv(args, folder):
    """This repository's flags for the same settings (anything after -- comes last, so it wins). The temporary
    synthetic folder is not cached (.cache/ would keep a copy of every size tried)."""
    data = ["--data", args.ours_data] if args.ours_data else ["--data", folder, "--mm_emb_id", *args.mm_emb_id]
    if not args.data:
        data += ["--cache_dir", ""]
    return [*data, "--device", "cpu", "--maxlen", str(args.maxlen), "--hidden_units", str(args.hidden_units),
            "--num_blocks", str(args.num_blocks), "--num_heads", str(args.num_heads), "--dropout_rate",
            str(args.dropout_rate), "--norm_first" if args.norm_first else "--no-norm_first", "--batch_size",
            str(args.batch_size), "--loss", "bce", *args.ours_extra]


class Side:
    """One side's process: `ask` sends one JSON request line and returns its JSON answer."""

    def __init__(self, name, spec):
        self.name = name
        env = dict(os.environ, TQDM_DISABLE="1")  # the baseline's progress bars
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--baseline", spec["baseline"],
                                      "--serve", name, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.name} side stopped (status {self.proc.wait()}); its message is above")
        return json.loads(line)

    def ask(self, op, **fields):
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the side exits at the end of its input
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run_rounds(sides, args):
    """{(side, measure): [per-round results]} and {baseline measure: [per-round ours / baseline]}, each ratio
    taken between neighbouring measurements."""
    results, ratios = {}, {}
    for r in range(args.rounds):
        pairs = [((BASELINE, f"load, {w} workers"), {"op": "load", "batches": args.batches, "workers": w})
                 for w in args.num_workers]
        pairs.append(((BASELINE, "train"), {"op": "train", "steps": args.steps, "warmup": args.warmup_steps}))
        for (_, measure), request in pairs:
            ours_measure = "train" if measure == "train" else "load"
            a = sides[BASELINE].ask(**request, round=r)
            b = sides[OURS].ask(**request, round=r)
            results.setdefault((BASELINE, measure), []).append(a)
            results.setdefault((OURS, ours_measure), []).append(b)
            ratios.setdefault(measure, []).append(rate(b, ours_measure) / rate(a, measure))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return results, ratios


def rate(result, measure):
    """batches/s for loading, sequences/s for training."""
    return (result["batches"] if measure.startswith("load") else result["sequences"]) / result["seconds"]


def median_rate(results, key):
    return statistics.median(rate(r, key[1]) for r in results[key])


def median_seqs(results, key):
    return statistics.median(r["sequences"] / r["seconds"] for r in results[key])


def workers(n):
    return f"{n} worker{'' if n == 1 else 's'}"


def ratio_cell(values):
    rounds = ", ".join(f"{v:.2f}" for v in values)
    return f"{statistics.median(values):.2f}x ({rounds})"


def print_report(results, ratios, info, args, folder, argv):
    base, ours = info[BASELINE], info[OURS]
    print(f"\n## This repository beside the TAAC 2025 baseline, CPU, medians of {args.rounds} rounds\n")
    print("| side | data loading, batches/s | data loading, sequences/s | training, sequences/s |")
    print("|---|---|---|---|")
    train_base = median_rate(results, (BASELINE, "train"))
    for w in args.num_workers:
        key = (BASELINE, f"load, {w} workers")
        print(f"| baseline: MyDataset + DataLoader ({workers(w)}); BaselineModel | {median_rate(results, key):.2f} | "
              f"{median_seqs(results, key):,.0f} | {train_base:,.0f} |")
    key = (OURS, "load")
    print(f"| this repository: TrainBatches (in process); TrainStep | {median_rate(results, key):.2f} | "
          f"{median_seqs(results, key):,.0f} | {median_rate(results, (OURS, 'train')):,.0f} |")
    for w in args.num_workers:
        print(f"| ours / baseline ({workers(w)}): median of the rounds' ratios (each round) | "
              f"{ratio_cell(ratios[f'load, {w} workers'])} | | {ratio_cell(ratios['train'])} |")
    print(f"\n- torch threads: baseline {base['threads']}, this repository {ours['threads']} "
          f"({'--threads ' + str(args.threads) if args.threads else 'torch default'}, the same for both sides)")
    print(f"- batches per epoch: baseline {base['batches_per_epoch']}, this repository {ours['batches_per_epoch']}; "
          f"{args.batches} timed loading batches after 1 warm-up, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up, batch size {args.batch_size}")
    print(f"- parameters: baseline {base['parameters']:,}, this repository {ours['parameters']:,}")
    print(f"- data: {folder}" + ("" if args.data else f" (synthetic: {args.users} users, {args.items} items, "
                                 f"seed {args.seed}; removed after the run)"))
    if args.ours_data:
        print(f"- NOTE: this repository read {args.ours_data!r}, not the baseline's folder: the rows are not on the "
              f"same data")
    print("\ncommands:\n")
    print(f"    {shlex.join([sys.executable, *argv])}")
    print(f"    baseline: MyDataset({folder!r}, Namespace({base['args']}))")
    print(f"    this repository: config.build_config({ours['argv']!r})")
    if not args.data:
        print(f"    data: taac_synthetic.write(DIR, 'parquet', {args.users}, {args.items}, {args.seed}) = "
              f"python taac_synthetic.py --out DIR --layout parquet --users {args.users} --items {args.items} "
              f"--seed {args.seed}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve:
        return serve(args.serve, json.loads(args.spec))
    temp, folder = None, args.data and os.path.abspath(args.data)
    sides = {}
    try:
        if folder is None:
            sys.path.insert(0, ROOT)
            import taac_synthetic
            temp = tempfile.mkdtemp(prefix="baseline_speed_")
            taac_synthetic.write(temp, "parquet", args.users, args.items, args.seed, tuple(args.mm_emb_id))
            folder = os.path.join(temp, "train")
        spec = {"baseline": os.path.abspath(args.baseline), "data": folder, "threads": args.threads,
                "batch_size": args.batch_size, "maxlen": args.maxlen, "hidden_units": args.hidden_units,
                "num_blocks": args.num_blocks, "num_heads": args.num_heads, "dropout_rate": args.dropout_rate,
                "norm_first": args.norm_first, "mm_emb_id": args.mm_emb_id, "ours_argv": ours_argv(args, folder)}
        sides = {name: Side(name, spec) for name in (BASELINE, OURS)}  # both set up at once
        info = {name: side.answer() for name, side in sides.items()}
        results, ratios = run_rounds(sides, args)
        print_report(results, ratios, info, args, folder, ["bench/baseline_speed.py", *argv])
    finally:
        for side in sides.values():
            side.close()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- the sides' processes

def baseline_side(spec):
    """The baseline, called as its main.py calls it. Returns (info, loader(workers), count, train_step)."""
    import torch
    sys.path.insert(0, spec["baseline"])
    from dataset import MyDataset  # the baseline's, from --baseline
    from model import BaselineModel
    args = argparse.Namespace(batch_size=spec["batch_size"], lr=0.001, maxlen=spec["maxlen"],
                              hidden_units=spec["hidden_units"], num_blocks=spec["num_blocks"], num_epochs=1,
                              num_heads=spec["num_heads"], dropout_rate=spec["dropout_rate"], l2_emb=0.0,
                              device="cpu", inference_only=False, state_dict_path=None,
                              norm_first=spec["norm_first"], mm_emb_id=list(spec["mm_emb_id"]))
    dataset = MyDataset(spec["data"], args)
    beyond = [u for u in dataset.user_indices if u not in dataset.indexer_i_rev]
    if beyond and args.mm_emb_id:
        raise SystemExit(f"error (baseline side): {len(beyond)} user re-ids (e.g. {beyond[0]}) are not item re-ids; "
                         f"the baseline's fill_missing_feat looks user tokens up among the items and would stop "
                         f"with a KeyError (a folder with at least as many items as users avoids it)")
    model = BaselineModel(dataset.usernum, dataset.itemnum, dataset.feat_statistics, dataset.feature_types, args)
    bce = torch.nn.BCEWithLogitsLoss(reduction="mean")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    model.train()

    def loader(workers):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                           collate_fn=dataset.collate_fn)

    def train_step(batch):
        seq, pos, neg, token_type, next_token_type, _, seq_feat, pos_feat, neg_feat = batch
        pos_logits, neg_logits = model(seq, pos, neg, token_type, next_token_type, seq_feat, pos_feat, neg_feat)
        item_next = next_token_type == 1
        pos_real, neg_real = pos_logits[item_next], neg_logits[item_next]
        loss = bce(pos_real, torch.ones_like(pos_real)) + bce(neg_real, torch.zeros_like(neg_real))
        loss = loss + args.l2_emb * torch.norm(model.item_emb.weight)  # main.py adds it even at l2_emb 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    info = {"parameters": sum(p.numel() for p in model.parameters()), "batches_per_epoch": len(loader(0)),
            "args": ", ".join(f"{k}={v!r}" for k, v in vars(args).items())}
    return info, loader, lambda batch: len(batch[0]), train_step


def ours_side(spec):
    """This repository, as training/loop.py calls it. Returns (info, loader(workers), count, train_step)."""
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    import dataset
    from cli import UsageError
    from config import build_config
    from training import loop
    from training import run as repo_run
    repo_run.keep_freed_memory()  # as main.main() does
    device = torch.device("cpu")
    try:
        config = build_config(spec["ours_argv"])
        config, _, split, model, loss, sampler, optimizer = repo_run.prepare(config, device)
    except UsageError as e:
        raise SystemExit(f"error (this repository's side): {e}\n(if it cannot read the folder, --ours_data "
                         f"synthetic measures this side on its embedded log)") from None
    batches = dataset.TrainBatches(split, config.model.maxlen, config.train.batch_size,
                                   sampler=sampler if loss.per_position_negatives else None)
    step = loop.TrainStep(model, loss, sampler, config.loss.l2_emb)
    step.train()
    rng = np.random.default_rng(0)

    def loader(workers):  # batches are built in this process; `workers` is the baseline's knob
        return Epochs(batches, rng)

    def train_step(batch):
        out = step(batch.to(device))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    info = {"parameters": sum(p.numel() for p in model.parameters()), "batches_per_epoch": len(batches),
            "argv": spec["ours_argv"]}
    return info, loader, lambda batch: batch.num_users, train_step


class Epochs:
    """TrainBatches as a DataLoader iterates: each pass over it is a new epoch."""

    def __init__(self, batches, rng):
        self.batches, self.rng = batches, rng

    def __iter__(self):
        return self.batches.epoch(self.rng)


def endless(loader):
    """The loader's batches, epoch after epoch."""
    return (batch for _ in itertools.count() for batch in loader)


def time_loading(loader, count, n):
    """One warm-up batch (and worker start-up), then n batches timed; the loader is closed after."""
    gc.collect()
    batches = endless(loader)
    next(batches)
    sequences, start = 0, time.perf_counter()
    for _ in range(n):
        sequences += count(next(batches))
    seconds = time.perf_counter() - start
    batches.close()  # shuts a DataLoader's workers down before the other side is timed
    return {"seconds": seconds, "batches": n, "sequences": sequences}


def time_training(loader, count, train_step, steps, warmup):
    """warmup steps, then `steps` steps timed around the step alone (the batch is drawn before the clock)."""
    gc.collect()
    batches = endless(loader)
    for _ in range(warmup):
        train_step(next(batches))
    seconds = sequences = 0
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        train_step(batch)
        seconds += time.perf_counter() - start
        sequences += count(batch)
    batches.close()
    return {"seconds": seconds, "steps": steps, "sequences": sequences}


def serve(side, spec):
    """A side's process: set up, answer requests on stdin (one JSON line each) until its input ends."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the sides' own prints go to stderr; stdout carries the answers only
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    info, loader, count, train_step = (baseline_side if side == BASELINE else ours_side)(spec)
    answers.write(json.dumps({**info, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        torch.manual_seed(request["round"])  # the baseline's shuffle and both sides' dropout
        if request["op"] == "load":
            result = time_loading(loader(request["workers"]), count, request["batches"])
        else:
            result = time_training(loader(0), count, train_step, request["steps"], request["warmup"])
        answers.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
