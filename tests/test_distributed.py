"""torchrun (DDP, gloo on CPU) with 2 processes: synchronised weights, the same loss and update as one
process on the union of the ranks' batches, gathered negatives, and main.py end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from config import build_config
from conftest import Replay
from dataset import Batch
from training import loop, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--data", "synthetic", "--loss", "infonce", "--gather_negatives", "--dropout_rate", "0",
         "--hidden_units", "16", "--batch_size", "32", "--maxlen", "20", "--cache_dir", "", "--sampled_metrics",
         "--rare_below", "5"]


def torchrun(*argv, timeout=240, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(os.path.join(ROOT, "tests", "ddp_worker.py"), str(out), *FLAGS)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def union(batches):
    width = max(b["seq"].shape[1] for b in batches)

    def pad(x):  # left padding
        return torch.nn.functional.pad(x, (width - x.shape[1], 0))
    seq, pos, neg = (torch.cat([pad(b[k]) for b in batches]) for k in ("seq", "pos", "neg"))
    rows = (pos != 0).view(-1).nonzero().squeeze(1)
    return Batch(seq, pos, torch.cat([b["users"] for b in batches]), rows, neg)


def built(flags):
    """(config, data, split, (model, loss, sampler, optimizer)) as main.py builds them, on the CPU."""
    config, data, split, *parts = run.prepare(build_config(flags), torch.device("cpu"))
    return config, data, split, parts


def test_ranks_hold_identical_weights_after_steps(ranks):
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
    table = "item_tower.id_emb.weight"
    assert not torch.equal(ranks[0]["final"][table], ranks[0]["initial"][table])
    # each rank trained on its own users
    assert not set(ranks[0]["batches"][0]["users"].tolist()) & set(ranks[1]["batches"][0]["users"].tolist())


def test_ddp_matches_one_process_on_the_global_batch(ranks):
    config, data, split, (model, loss_fn, sampler, optimizer) = built(FLAGS)
    model.load_state_dict(ranks[0]["initial"])
    steps = [union([ranks[0]["batches"][i], ranks[1]["batches"][i]]) for i in range(len(ranks[0]["batches"]))]
    cpu = torch.device("cpu")
    loss, _, _ = loop.train_epoch(loop.make_step(model, loss_fn, sampler, config, cpu), optimizer, Replay(steps),
                                   config, cpu, loop.LoopState(), loop.NullWriter(), loop.GracefulStop())
    assert loss == pytest.approx(ranks[0]["loss"], rel=1e-5)
    d = config.model.hidden_units
    for key, value in model.state_dict().items():
        expected = ranks[0]["final"][key]
        if key.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a query equally, so softmax attention gives it a zero
            # gradient; what reaches it is rounding noise, which Adam scales up to full-size steps.
            value, expected = torch.cat([value[:d], value[2 * d:]]), torch.cat([expected[:d], expected[2 * d:]])
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=key)


def test_sharded_validation_equals_one_process(ranks, monkeypatch):
    from ddp_worker import EVAL_BATCH

    from eval import metrics
    config, data, split, (model, _, _, _) = built(FLAGS)
    model.load_state_dict(ranks[0]["final"])
    monkeypatch.setattr(metrics, "users_per_batch", lambda *sizes: EVAL_BATCH)
    assert ranks[1]["valid"] is None  # only rank 0 gets the metrics
    assert ranks[0]["valid"] == loop.run_evaluation(model, split, config, torch.device("cpu"), "valid")


def test_gathered_pool_is_world_size_times_local_with_gradients(ranks):
    r0, r1 = ranks
    assert r0["world"] == 2 and r0["even_rows"] == 2 * 4 and r0["even_bias_is_none"]
    # uneven pools (3 and 4 rows): padded to 4 each, the padding masked by -inf
    assert r0["uneven_ids"].tolist() == [1, 2, 3, 0, 1, 2, 3, 4]
    assert r0["uneven_bias"].tolist() == [0, 0, 0, float("-inf"), 0, 0, 0, 0]
    assert r0["uneven_pool"][:, 0].tolist() == [1, 1, 1, 0, 2, 2, 2, 2]
    # rank r's loss is sum((1..8) * (r + 1) * pool): a row's gradient sums both ranks' weights, (1 + 2) x position
    assert r0["uneven_grad"][:, 0].tolist() == [3, 6, 9]
    assert r1["uneven_grad"][:, 0].tolist() == [15, 18, 21, 24]


@pytest.mark.parametrize("average", [[], ["--ema_decay", "0.9"]])
def test_main_under_torchrun_rank0_writes(tmp_path, average):
    run_dir = tmp_path / "run"
    proc = torchrun("main.py", "--num_epochs", "2", "--eval_every", "1", "--run_dir", str(run_dir), *FLAGS, *average)
    assert proc.stdout.count("x 2 processes") == 1  # one rank reports
    log = (run_dir / "logs" / "train.log").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]  # one writer
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["users"] == 4000 and results["best_epoch"] >= 1
    assert sorted(os.listdir(run_dir / "ckpt")) == [".lock", "best.pt", "config.json", "id_map.json", "last.pt"]
    assert (run_dir / "ckpt" / ".lock").read_text().strip().isdigit()  # the pid of the rank that owned the run
    last = torch.load(run_dir / "ckpt" / "last.pt", weights_only=True)
    assert ("online_model" in last) == bool(average)  # the ranks' identical averages, written once


@pytest.mark.parametrize("tower", [[], ["--no_item_id"]])
def test_torchrun_with_item_side_information(tmp_path, tower):
    # every trainable parameter must take part in the loss, or DDP stops at the second step
    attrs = tmp_path / "items.csv"
    attrs.write_text("item_id,topic\n" + "".join(f"{i},{i % 40}\n" for i in range(1, 3001)))
    torchrun("main.py", "--num_epochs", "1", "--run_dir", str(tmp_path / "run"), "--item_features", str(attrs),
             *FLAGS, *tower)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"]["users"] == 4000


def test_fewer_batches_than_processes_is_an_error_on_every_rank(tmp_path):
    proc = torchrun("main.py", "--run_dir", str(tmp_path / "run"), *FLAGS, "--batch_size", "4000", check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("make fewer batches of --batch_size 4000 than the 2 processes") == 2
