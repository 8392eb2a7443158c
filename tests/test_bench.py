"""Every bench/ script runs at its smallest size and prints its figures, so a refactor cannot break one silently.

Each script runs as `python bench/<name>.py ...` from the repository root (OMP_NUM_THREADS=1), on tiny data:
a small log written here, or a small synthetic competition folder. Many scripts import the repository lazily,
inside functions or child processes: these runs are what prove those imports still work. Two need what this
repository does not ship and are skipped without it:
  bench/baseline_speed.py       a checkout of TencentAdvertisingAlgorithmCompetition/baseline_2025 (its
                                dataset.py and model.py) named by $BASELINE_2025
  bench/rectools_reference.py   rectools and pytorch_lightning, in this interpreter or in $RECTOOLS_PYTHON
Every child's temporary files and caches go under the test's folder (TMPDIR, SASREC_CACHE_DIR).

The runs are single-threaded processes, most of them a torch import and a second of work, so they go
WORKERS at a time, longest first, from the first test on; each test checks its own script's output.
"""
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

WORKERS = min(2, os.cpu_count() or 1)
NUMBER = r"[\d,]+(?:\.\d+)?"
MODEL = ["--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1"]  # main.py flags of a tiny model


def write_lines(path, users=100, items=60, seed=0):
    """A log of `user item item ...` lines (S3-Rec files)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for u in range(1, users + 1):
            f.write(f"{u} " + " ".join(str(rng.randint(1, items)) for _ in range(rng.randint(3, 12))) + "\n")
    return path


def write_pairs(path, users=300, items=80, seed=0):
    """A log of `user item` lines (SASRec files)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for u in range(1, users + 1):
            f.write("".join(f"{u} {rng.randint(1, items)}\n" for _ in range(rng.randint(3, 15))))
    return path


def skip_reason(name):
    if name == "baseline_speed":
        baseline = os.environ.get("BASELINE_2025")
        if not baseline or not all(os.path.isfile(os.path.join(baseline, f)) for f in ("dataset.py", "model.py")):
            return ("needs a checkout of TencentAdvertisingAlgorithmCompetition/baseline_2025 (its dataset.py and "
                    "model.py) named by $BASELINE_2025")
    if name == "rectools_reference" and not os.environ.get("RECTOOLS_PYTHON") and not all(
            importlib.util.find_spec(m) for m in ("rectools", "pytorch_lightning")):
        return ("needs rectools and pytorch_lightning (not dependencies of this repository), in this interpreter or "
                "in the one $RECTOOLS_PYTHON names")
    return None


# Each script's smallest run: (tmp folder, folders of the runs so far) -> its arguments. Longest first.
SMOKES = {
    "ddp_speed": lambda tmp, _: [
        "--data", write_pairs(tmp / "log.txt"), "--losses", "infonce", "--epochs", 2, "--batch_size", 64,
        "--rows", "one_thread", "gather", "--", *MODEL],  # one process, and torchrun (with --gather_negatives)
    "taac_scale": lambda tmp, _: [
        "--out", tmp / "taac", "--users", 100, "--items", 150, "--mm_emb_id", 81, "--steps", 2, "--warmup", 1,
        "--batch_size", 32],
    "gpu_check": lambda tmp, _: ["--dry_run", "--out", tmp / "gpu_check"],
    "scale_memory": lambda tmp, _: ["--interactions", 3000, "--items", 200, "--steps", 2, "--work", tmp / "work"],
    "baseline_speed": lambda tmp, _: [
        "--baseline", os.environ["BASELINE_2025"], "--users", 50, "--items", 100, "--batch_size", 16, "--batches", 2,
        "--steps", 2, "--warmup_steps", 1, "--rounds", 1, "--maxlen", 10, "--hidden_units", 16],
    "train_speed": lambda tmp, _: [
        "--data", write_pairs(tmp / "log.txt"), "--losses", "bce", "--epochs", 1, "--ab", "--encoder hstu", "--",
        *MODEL],
    "quality": lambda tmp, _: [  # one dataset (a small LastFM.txt), one variant, one seed, one epoch
        "--data_dir", os.path.dirname(write_lines(tmp / "LastFM.txt", users=200, items=80)), "--datasets", "lastfm",
        "--variants", "default", "--seeds", 42, "--runs", tmp / "runs", "--", "--num_epochs", 1, *MODEL],
    "taac_ablation": lambda tmp, _: [
        "--out", tmp / "ablation", "--users", 100, "--items", 150, "--seeds", 0, "--jobs", 1, "--variants", "full",
        "--", *MODEL, "--batch_size", 64, "--num_epochs", 1],
    "eval_memory": lambda tmp, _: [
        "--users", 20, "--items", 50, "--log", tmp / "dense.txt", "--", *MODEL, "--batch_size", 64],
    "rectools_reference": lambda tmp, _: ["--data", write_lines(tmp / "log.txt"), "--epochs", 1],
    "per_position_speed": lambda tmp, _: [
        "--rows", 20, "--dim", 8, "--negatives", 4, "--items", 50, "--rounds", 1],
    "eval_speed": lambda tmp, _: [
        "--data", write_lines(tmp / "log.txt"), "--batch", 32, "--rounds", 1, "--threads", 1],
    "retrieval": lambda tmp, _: [
        "--items", 1000, "--queries", 50, "--dim", 8, "--nlist", 8, "--nprobe", 1, "--hnsw_m", 8,
        "--ef_construction", 16, "--ef_search", 16],
    "infonce_memory": lambda tmp, _: [
        "--batch_size", 4, "--maxlen", 5, "--hidden_units", 8, "--num_blocks", 1, "--num_items", 50],
    "results_table": lambda tmp, folders: sorted((folders["quality"] / "runs").glob("*/results.json")),
}
AFTER = {"results_table": "quality"}  # tabulates quality's runs


def run_script(name, tmp, folders, futures):
    """bench/<name>.py's smallest run; it must exit 0. Returns (stdout, its folder)."""
    if name in AFTER:
        futures[AFTER[name]].result()
    argv = SMOKES[name](tmp, folders)
    (tmp / "tmp").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp / "tmp"),
               SASREC_CACHE_DIR=str(tmp / "cache"))
    python = (os.environ.get("RECTOOLS_PYTHON") or sys.executable) if name == "rectools_reference" else sys.executable
    done = subprocess.run([python, os.path.join("bench", f"{name}.py"), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"bench/{name}.py exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done.stdout, tmp


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory):
    """smoke(name) -> (stdout, folder) of bench/<name>.py's smallest run. The runs of every selected test start
    together, WORKERS at a time, when the first test asks."""
    selected = {item.name[len("test_"):] for item in request.session.items if item.path == request.path}
    wanted = {name for name in SMOKES if name in selected and not skip_reason(name)}
    wanted |= {AFTER[name] for name in wanted if name in AFTER}
    folders = {name: tmp_path_factory.mktemp(name) for name in SMOKES if name in wanted}
    futures = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for name in folders:
            futures[name] = pool.submit(run_script, name, folders[name], folders, futures)

        def result(name):
            reason = skip_reason(name)
            if reason:
                pytest.skip(reason)
            return futures[name].result()
        yield result
        pool.shutdown(cancel_futures=True)


def test_baseline_speed(smoke):
    out, _ = smoke("baseline_speed")
    assert re.search(rf"\| this repository: TrainBatches \(in process\); TrainStep \| {NUMBER} \| {NUMBER} \| "
                     rf"{NUMBER} \|", out), out
    assert re.search(r"\| ours / baseline \(0 workers\): median of the rounds' ratios \(each round\) \| "
                     rf"{NUMBER}x", out), out


def test_ddp_speed(smoke):
    out, _ = smoke("ddp_speed")
    assert "| loss | run | sequences / s | last epoch's loss |" in out
    for run in ("1 process x 1 thread", "torchrun 2 x 1 thread, batch 32 each, --gather_negatives"):
        assert re.search(rf"\| infonce \| {re.escape(run)} \| {NUMBER} \| \d+\.\d{{4}} \|", out), out


def test_eval_memory(smoke):
    out, tmp = smoke("eval_memory")
    assert f"writing {tmp / 'dense.txt'}: " in out and (tmp / "dense.txt").exists()
    assert re.search(r"peak RSS \d+ MB for the whole run \(\d+ s\); train.log peak_rss_mb \[\d+\.\d\]", out), out


def test_eval_speed(smoke):
    out, _ = smoke("eval_speed")
    ways = ("log order", "every position", "last position")
    assert all(re.search(rf"{way} +median \d+\.\d\d s", out) for way in ways), out
    assert "same vectors: True" in out


def test_gpu_check(smoke):
    out, tmp = smoke("gpu_check")
    with open(tmp / "gpu_check" / "gpu_check.json") as f:
        results = json.load(f)
    assert list(results["stages"]) == ["beauty", "taac_scale", "retrieval", "pipeline", "tests"], results
    for name, stage in results["stages"].items():
        assert stage["status"] == "ok" or (stage["status"] == "skipped" and stage["reason"]), (name, stage)
        assert re.search(rf"^{name}: (ok|skipped) ", out, re.M), out
    assert results["env"]["torch"] and (tmp / "gpu_check" / "gpu_check.md").exists()


def test_infonce_memory(smoke):
    out, _ = smoke("infonce_memory")
    assert re.search(r"B=4 L=5 R=20 rows, chunk_elems=\d+: peak RSS \d+ MB .* loss \d+\.\d{4}", out), out


def test_per_position_speed(smoke):
    out, _ = smoke("per_position_speed")
    for route in ("gathered", "dense"):
        assert re.search(rf"{route} +median \d+\.\d{{3}} s", out), out


def test_quality(smoke):
    out, tmp = smoke("quality")
    assert re.search(rf"\| LastFM \| default \| 1 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|", out), out
    assert (tmp / "runs" / "quality.md").read_text() in out


def test_rectools_reference(smoke):
    out, _ = smoke("rectools_reference")
    assert re.search(r"test \(best validation recall@10 model\): HR@10 \d\.\d{4} NDCG@10 \d\.\d{4}", out), out


def test_results_table(smoke):
    out, _ = smoke("results_table")
    assert out.startswith("| data | loss | d | HR@10 | NDCG@10 |")
    assert re.search(rf"\| LastFM \| infonce \(T=0\.05\) \| 16 \| {NUMBER} \| {NUMBER} \|", out), out


def test_retrieval(smoke):
    out, _ = smoke("retrieval")
    assert "1,000 items, 50 queries, d=8, k=10" in out
    for method in (r"faiss Flat \(exact\)", r"torch matmul \+ topk", "faiss IVF nlist=8 nprobe=1",
                   "faiss HNSW M=8 ef=16"):
        assert re.search(rf"{method} +\d+\.\d +\d+ +[01]\.\d{{4}}", out), out


def test_scale_memory(smoke):
    out, _ = smoke("scale_memory")
    for process in ("baseline", "prepare", "train", "train, small log"):
        assert re.search(rf"\| {process} \| {NUMBER} \| {NUMBER} \|", out), out
    assert re.search(rf"\| train \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|", out), out


def test_taac_ablation(smoke):
    out, _ = smoke("taac_ablation")
    assert "| variant | valid score | test score | test NDCG@10 | test score - full |" in out
    assert re.search(rf"\| full \| {NUMBER} \| {NUMBER} \| {NUMBER} \| \+0\.0000 \|", out), out


def test_taac_scale(smoke):
    out, _ = smoke("taac_scale")
    for stage in ("prepare", "prepare_cached"):
        assert re.search(rf"^{stage}: seconds {NUMBER}, peak_rss_mb {NUMBER}, users 100, items 150", out, re.M), out
    assert re.search(rf"^train: steps 2, sequences_per_s {NUMBER}", out, re.M), out
    assert re.search(rf"^infer: users 100, embed_seconds {NUMBER}, search_seconds {NUMBER}", out, re.M), out


def test_train_speed(smoke):
    out, _ = smoke("train_speed")
    assert "| run | s / epoch | users / s |" in out
    for run in ("bce", "bce, --encoder hstu"):
        cells = rf"\| this repo, {run} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|"
        assert re.search(cells, out), out


def test_every_script_has_a_smoke_test():
    scripts = {name[:-3] for name in os.listdir(os.path.join(ROOT, "bench")) if name.endswith(".py")}
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert scripts <= set(SMOKES) and scripts <= tests, f"bench scripts without a smoke run: {sorted(scripts - tests)}"
