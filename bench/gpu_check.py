"""One pass over what a lent GPU machine should measure, within a time budget; results written as it goes.

On the lent machine (one H100 / H200), from the repository root, with ../shared/data/Beauty.txt present:

    python bench/gpu_check.py --out $OUT --budget_s 480
    python bench/gpu_check.py --out $OUT --budget_s 480 --baseline baseline_2025   # + the official baseline

Carry (run's `carry`): a checkout of baseline_2025 (its dataset.py and model.py) for --baseline, and a faiss
wheel if faiss should be compared; nothing else is needed (no network there). On CPU, in a few seconds:

    python bench/gpu_check.py --dry_run --out /tmp/gc

Stages, in priority order; each records its wall seconds, and an error's first line instead of failing the run;
once --budget_s has passed, the remaining stages are recorded as skipped:
  1. beauty      configs/default.toml on --data for --epochs epochs, fp32, --amp bf16 and --compile, each a
                 main.py process: sequences/s and validation NDCG@10 from its logs/train.log; then in process, a
                 few steps per precision for the peak GPU memory, and a few under
                 torch.cuda.set_sync_debug_mode("error"): the first call that synchronised with the host.
  2. taac_scale  a competition-scale synthetic folder (taac_synthetic.py, parquet; --taac_users x --taac_items,
                 mm 81 + 82): training sequences/s on the device (bench/taac_scale.py's step); with --baseline,
                 bench/baseline_speed.py on the same folder.
  3. retrieval   exact top-10 of random user vectors over random item vectors: torch matmul + topk in chunks on
                 the device, and faiss-cpu's flat index if faiss imports; queries/s and agreement with a numpy
                 reference (scores at the returned ids, so ties do not count as differences).
  4. pipeline    main.py --config configs/taac.toml for one epoch on stage 2's folder, then eval/competition.py.
  5. tests       python -m pytest -q -x with CUDA visible (not in --dry_run).
Writes OUT/gpu_check.json and OUT/gpu_check.md after every stage (atomically); prints one line per stage.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("beauty", "taac_scale", "retrieval", "pipeline", "tests")
TINY = ["--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1", "--batch_size", "64"]


class Skipped(Exception):
    """A stage (or part of one) that cannot run here; its message is the reason."""


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("runs", "gpu_check"))
    p.add_argument("--budget_s", type=float, default=480.0, help="stages not started by then are skipped")
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes, synthetic data: a few seconds")
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "Beauty.txt"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--taac_users", type=int, default=1_000_000)
    p.add_argument("--taac_items", type=int, default=500_000)
    p.add_argument("--baseline", metavar="DIR", help="checkout of baseline_2025 (dataset.py, model.py)")
    p.add_argument("--retrieval_items", type=int, default=500_000)
    p.add_argument("--retrieval_queries", type=int, default=20_000)
    p.add_argument("--retrieval_dim", type=int, default=64)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = p.parse_args(argv)
    if args.dry_run:
        args.data, args.epochs, args.taac_users, args.taac_items = "synthetic", 1, 100, 150
        args.retrieval_items, args.retrieval_queries, args.retrieval_dim = 1000, 50, 8
    args.out = os.path.abspath(args.out)
    if os.path.exists(args.data):  # main.py runs from the repository root
        args.data = os.path.abspath(args.data)
    return args


class Check:
    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.deadline = self.start + args.budget_s
        cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda" if cuda else "cpu")
        self.results = {"command": " ".join([sys.executable, *sys.argv]), "dry_run": args.dry_run,
                        "budget_s": args.budget_s, "env": {}, "stages": {}}
        self.taac_folder = os.path.join(args.out, "taac")
        os.makedirs(args.out, exist_ok=True)

    def left(self):
        return self.deadline - time.perf_counter()

    def timeout(self):
        """A child's time limit: what is left of the budget (at least a few seconds)."""
        return max(5.0, self.left())

    def child(self, argv, **kw):
        """Runs argv from the repository root within the budget; raises with the end of its output on failure."""
        env = dict(os.environ, TQDM_DISABLE="1", **({"CUDA_VISIBLE_DEVICES": ""} if self.args.dry_run else {}))
        try:
            done = subprocess.run([str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=self.timeout(), **kw)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{os.path.basename(str(argv[1]))} ran past the budget ({e.timeout:.0f} s)") from None
        if done.returncode:
            tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise RuntimeError(f"{os.path.basename(str(argv[1]))} exited {done.returncode}: {tail}")
        return done.stdout

    # ------------------------------------------------------------------------------------------ output
    def write(self):
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.atomic("gpu_check.json", json.dumps(self.results, indent=1, default=str) + "\n")
        self.atomic("gpu_check.md", self.markdown())

    def atomic(self, name, text):
        path = os.path.join(self.args.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def markdown(self):
        r = self.results
        lines = ["# GPU check", "", f"`{r['command']}`", "", f"elapsed {r['elapsed_s']} s of a {r['budget_s']:.0f} s "
                 f"budget{' (dry run)' if r['dry_run'] else ''}", "", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in r["env"].items()]
        lines += ["", "## Stages", "", "| stage | status | seconds | figures / reason |", "|---|---|---|---|"]
        for name, s in r["stages"].items():
            detail = s.get("reason") or s.get("error") or json.dumps(s.get("figures", {}), default=str)
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {detail.replace('|', '/')} |")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------------ stages
    def environment(self):
        env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
               "device": str(self.device), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
        if torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name(0)
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        done = subprocess.run([sys.executable, "-c", "import faiss; print(faiss.__version__)"], capture_output=True,
                              text=True)
        env["faiss"] = done.stdout.strip() if done.returncode == 0 else None
        self.results["env"] = env
        self.write()
        print("env: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    def run_stage(self, name):
        if name not in self.args.stages:
            entry = {"status": "skipped", "reason": "not in --stages"}
        elif self.left() <= 0:
            entry = {"status": "skipped", "reason": f"--budget_s {self.args.budget_s:.0f} s spent"}
        else:
            start = time.perf_counter()
            try:
                entry = {"status": "ok", "figures": getattr(self, f"stage_{name}")()}
            except Skipped as e:
                entry = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - recorded, and the next stage goes on
                entry = {"status": "error", "error": first_line(e)}
                traceback.print_exc()
            entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results["stages"][name] = entry
        self.write()
        detail = entry.get("reason") or entry.get("error") or json.dumps(entry.get("figures"), default=str)
        print(f"{name}: {entry['status']} ({entry.get('seconds', 0):.1f} s) {detail}", flush=True)

    def stage_beauty(self):
        a, figures = self.args, {}
        extra = [*TINY, "--device", "cpu"] if a.dry_run else []
        variants = {"fp32": ["--amp", "none"], "bf16": ["--amp", "bf16"], "compile": ["--amp", "none", "--compile"]}
        for variant, flags in variants.items():
            if a.dry_run and variant != "fp32":
                figures[variant] = {"status": "skipped", "reason": "dry run: fp32 only"}
                continue
            if self.left() <= 0:
                figures[variant] = {"status": "skipped", "reason": "budget spent"}
                continue
            run_dir = os.path.join(a.out, "runs", variant)
            start = time.perf_counter()
            try:
                self.child([sys.executable, "main.py", "--config", "configs/default.toml", "--data", a.data,
                            "--num_epochs", a.epochs, "--eval_every", a.epochs, "--run_dir", run_dir,
                            "--cache_dir", os.path.join(a.out, "cache"), *flags, *extra])
                figures[variant] = {"status": "ok", **read_train_log(run_dir)}
            except Exception as e:  # noqa: BLE001
                figures[variant] = {"status": "error", "error": first_line(e)}
            figures[variant]["seconds"] = round(time.perf_counter() - start, 1)
        figures["in_process"] = self.beauty_in_process(extra)
        return figures

    def beauty_in_process(self, extra, steps=10):
        """Peak GPU memory over `steps` steps per precision, then the same steps under sync debug mode 'error'."""
        sys.path.insert(0, ROOT)
        from config import build_config
        from training import loop, run
        cuda, out = self.device.type == "cuda", {}

        def train(amp):
            config = build_config(["--config", "configs/default.toml", "--data", self.args.data, "--cache_dir",
                                   os.path.join(self.args.out, "cache"), "--amp", amp, *extra])
            torch.manual_seed(0)
            config, data, split, model, loss, sampler, optimizer = run.prepare(config, self.device)
            batches = first_batches(split, config, sampler if loss.per_position_negatives else None, steps)
            step = loop.make_step(model, loss, sampler, config, self.device)
            return lambda state: loop.train_epoch(step, optimizer, batches, config, self.device, state,
                                                  loop.NullWriter(), loop.GracefulStop())

        for amp in ("none", "bf16") if cuda else ("none",):
            epoch = train(amp)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            _, seq_per_s, _ = epoch(loop.LoopState())
            out[f"amp_{amp}"] = {"steps": steps, "seq_per_s": round(seq_per_s, 1), "peak_gpu_mb":
                                 round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None}
        if not cuda:
            out["sync_check"] = {"status": "skipped", "reason": "CUDA only"}
            return out
        epoch, state = train("none"), loop.LoopState()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            epoch(state)
            out["sync_check"] = {"status": "ok", "raised": None, "steps": state.step}
        except Exception as e:  # noqa: BLE001
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(ROOT)]
            where = frames[-1] if frames else None
            out["sync_check"] = {"status": "raised", "error": first_line(e), "steps_done": state.step,
                                 "of_steps": steps, "at": where and f"{os.path.relpath(where.filename, ROOT)}:"
                                 f"{where.lineno} in {where.name}: {where.line}"}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return out

    def ensure_taac_folder(self):
        a, folder = self.args, self.taac_folder
        if os.path.isdir(os.path.join(folder, "train")):
            return None
        sys.path.insert(0, ROOT)
        import taac_synthetic
        start = time.perf_counter()
        taac_synthetic.write(folder, "parquet", a.taac_users, a.taac_items, mm_ids=self.mm_ids(), mean_clicks=15)
        return round(time.perf_counter() - start, 1)

    def mm_ids(self):
        return ("81",) if self.args.dry_run else ("81", "82")

    def taac_flags(self):
        return ["--data", os.path.join(self.taac_folder, "train"), "--mm_emb_id", *self.mm_ids(),
                "--cache_dir", os.path.join(self.taac_folder, "cache")]

    def stage_taac_scale(self):
        a = self.args
        figures = {"users": a.taac_users, "items": a.taac_items, "generate_seconds": self.ensure_taac_folder()}
        sys.path.insert(0, ROOT)
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        import taac_scale

        from config import build_config
        from dataset import TrainBatches
        from training import run
        from training.loop import TrainStep, target_weights
        ns = argparse.Namespace(out=self.taac_folder, mm_emb_id=list(self.mm_ids()), batch_size=32 if a.dry_run
                                else 256)
        start = time.perf_counter()
        config, data, split, model, loss, sampler, optimizer = run.prepare(
            build_config([*taac_scale.model_flags(ns), "--device", str(self.device)]), self.device)
        figures["prepare_seconds"] = round(time.perf_counter() - start, 1)
        batches = TrainBatches(split, config.model.maxlen, config.train.batch_size,
                               sampler=sampler if loss.per_position_negatives else None,
                               target_weights=target_weights(config.loss, data))
        warmup, steps = (1, 2) if a.dry_run else (10, 200)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step, seqs, timed, t0 = TrainStep(model, loss, sampler), 0, 0, None
        model.train()
        while timed < steps:
            for i, batch in enumerate(batches.epoch(np.random.default_rng(timed))):
                if t0 is None and i == warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                out = step(batch.to(self.device))
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                if t0 is not None:
                    seqs, timed = seqs + batch.num_users, timed + 1
                    if timed == steps:
                        break
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        figures.update(steps=steps, batch_size=config.train.batch_size, sequences_per_s=round(seqs / seconds, 1),
                       peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None)
        del model, optimizer, step
        if a.baseline:
            try:
                out = self.child([sys.executable, os.path.join("bench", "baseline_speed.py"), "--baseline",
                                  a.baseline, "--data", os.path.join(self.taac_folder, "train"), "--mm_emb_id",
                                  *self.mm_ids(), "--batches", 20, "--steps", 20, "--rounds", 1, "--batch_size", 256,
                                  "--", "--device", str(self.device)])
                figures["baseline"] = {"status": "ok", "table": [ln for ln in out.splitlines() if ln.startswith("|")]}
            except Exception as e:  # noqa: BLE001
                figures["baseline"] = {"status": "error", "error": first_line(e)}
        else:
            figures["baseline"] = {"status": "skipped", "reason": "no --baseline (a checkout of baseline_2025)"}
        return figures

    def stage_retrieval(self):
        a, k = self.args, 10
        rng = np.random.default_rng(0)
        items = rng.standard_normal((a.retrieval_items, a.retrieval_dim), dtype=np.float32)
        queries = rng.standard_normal((a.retrieval_queries, a.retrieval_dim), dtype=np.float32)
        check = min(len(queries), 1000)  # the numpy reference, on the first queries
        ref_scores = -np.partition(-(queries[:check] @ items.T), k - 1, axis=1)[:, :k]
        ref_scores = np.sort(ref_scores, axis=1)[:, ::-1]
        figures = {"items": len(items), "queries": len(queries), "dim": a.retrieval_dim, "k": k}

        def agree(ids):
            got = np.sort(np.einsum("qd,qkd->qk", queries[:check], items[ids[:check]]), axis=1)[:, ::-1]
            return bool(np.allclose(got, ref_scores, rtol=1e-4, atol=1e-4))

        cuda = self.device.type == "cuda"
        x, q = torch.from_numpy(items).to(self.device), torch.from_numpy(queries).to(self.device)
        chunk = 2048  # queries per matmul: 2048 x 500k scores, 4 GB

        def torch_topk(q, x):
            return torch.cat([torch.topk(q[s:s + chunk] @ x.T, k, dim=1).indices
                              for s in range(0, len(q), chunk)]).cpu().numpy()
        torch_topk(q, x)  # warm-up
        start = time.perf_counter()
        ids = torch_topk(q, x)
        seconds = time.perf_counter() - start
        figures["torch"] = {"device": str(self.device), "queries_per_s": round(len(q) / seconds, 1),
                            "agrees_with_reference": agree(ids)}
        del x, q
        if cuda:
            torch.cuda.empty_cache()
        if not self.results["env"].get("faiss"):
            figures["faiss"] = {"status": "skipped", "reason": "faiss does not import (carry a faiss-cpu wheel)"}
            return figures
        sys.path.insert(0, ROOT)
        from eval.infer import choose_blas_kernel
        choose_blas_kernel()
        import faiss
        index = faiss.IndexFlatIP(a.retrieval_dim)
        index.add(items)
        start = time.perf_counter()
        _, fids = index.search(queries, k)
        seconds = time.perf_counter() - start
        figures["faiss"] = {"status": "ok", "queries_per_s": round(len(queries) / seconds, 1),
                            "agrees_with_reference": agree(fids), "same_ids_as_torch":
                            float(np.mean(np.sort(fids, 1) == np.sort(ids, 1)))}
        return figures

    def stage_pipeline(self):
        figures = {"generate_seconds": self.ensure_taac_folder()}
        run_dir = os.path.join(self.args.out, "runs", "pipeline")
        extra = [*TINY, "--device", "cpu"] if self.args.dry_run else []
        start = time.perf_counter()
        self.child([sys.executable, "main.py", "--config", "configs/taac.toml", *self.taac_flags(), "--num_epochs",
                    1, "--eval_every", 1, "--run_dir", run_dir, *extra])
        figures["train_seconds"] = round(time.perf_counter() - start, 1)
        try:
            figures.update(read_train_log(run_dir))
        except Exception as e:  # noqa: BLE001
            figures["train_log"] = first_line(e)
        start = time.perf_counter()
        self.child([sys.executable, os.path.join("eval", "competition.py"), "--ckpt", os.path.join(run_dir, "ckpt"),
                    "--eval_data", os.path.join(self.taac_folder, "eval"), "--out",
                    os.path.join(run_dir, "competition"), *(["--device", "cpu"] if self.args.dry_run else [])])
        figures["competition_seconds"] = round(time.perf_counter() - start, 1)
        return figures

    def stage_tests(self):
        if self.args.dry_run:
            raise Skipped("--dry_run (the suite runs on the GPU machine only)")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"], cwd=ROOT,
                              capture_output=True, text=True, timeout=self.timeout())
        lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        counts = {word: int(n) for n, word in
                  (m.split() for m in re.findall(r"\d+ (?:passed|failed|skipped|errors?)", last))}
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        return {"returncode": done.returncode, "summary": last, **counts, "failures": failed[:10]}


def first_batches(split, config, sampler, steps):
    """A TrainBatches whose epochs are their first `steps` batches (fewer than SYNC_EVERY: one loss read-back)."""
    import itertools

    from dataset import TrainBatches
    full = TrainBatches(split, config.model.maxlen, config.train.batch_size, sampler=sampler)

    class First:
        mean_rows = full.mean_rows

        def __len__(self):
            return min(steps, len(full))

        def epoch(self, rng):
            return itertools.islice(full.epoch(rng), len(self))
    return First()


def read_train_log(run_dir):
    """The last epoch's sequences/s, validation NDCG@10 and peak RSS from <run_dir>/logs/train.log."""
    with open(os.path.join(run_dir, "logs", "train.log")) as f:
        records = [json.loads(ln) for ln in f if ln.strip().startswith("{")]
    epochs = [r for r in records if "seq_per_s" in r]
    if not epochs:
        raise ValueError(f"no epoch record in {run_dir}/logs/train.log")
    valid = next((r["valid"] for r in reversed(epochs) if "valid" in r), {})
    return {"epochs": len(epochs), "seq_per_s": [round(r["seq_per_s"], 1) for r in epochs],
            "valid_ndcg10": valid.get("NDCG@10"), "peak_rss_mb": epochs[-1].get("peak_rss_mb")}


def main(argv=None):
    args = parse_args(argv)
    check = Check(args)
    check.environment()
    for name in STAGES:
        check.run_stage(name)
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md in {check.results['elapsed_s']} s")


if __name__ == "__main__":
    main()
