"""Reads of a tensor's value by the host inside a training step: each one stalls a GPU until its queue drains.

One step of every loss and option runs with Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__
counted by the project function that called them. Every site found must be in KNOWN_READS with the reason
it is there; a new one fails this test. (On a GPU, bench/gpu_check.py runs steps under
torch.cuda.set_sync_debug_mode("error"), which also sees the reads inside torch's operators.)
"""
import os
import sys

import numpy as np
import pytest
import torch

import cli
from config import build_config
from conftest import ROOT
from dataset import LeaveOneOut, TrainBatches
from readers.logs import make_synthetic
from training import loop, run

# (file, function) -> why the host reads a value there. The queue's are to go (the GPU issue); the
# operator-level read of accidental_hits (repeat_interleave sized by the hit counts) is not seen here, only
# by torch.cuda.set_sync_debug_mode on a GPU.
KNOWN_READS = {
    ("objectives/negative_queue.py", "NegativeQueue.__len__"): "the queue's fill level, kept in a buffer",
    ("objectives/negative_queue.py", "NegativeQueue.contents"): "the queue's write position, kept in a buffer",
    ("encoders/dropout.py", "Dropout.forward"):
        "CPU only: the numpy mask's seed drawn from torch's generator (CUDA: F.dropout)",
}
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
FLAGS = ["--data", "synthetic", "--device", "cpu", "--maxlen", "12", "--hidden_units", "16", "--num_blocks", "1",
         "--batch_size", "32", "--cache_dir", "", "--num_negatives", "16"]
OPTIONS = {
    "bce": ["--loss", "bce"],
    "gbce": ["--loss", "gbce"],
    "infonce": ["--loss", "infonce"],
    "infonce_learnt_t_hard": ["--loss", "infonce", "--learn_temperature", "--hard_negatives", "4"],
    "infonce_symmetric_queue": ["--loss", "infonce", "--symmetric", "--negative_queue", "64"],
    "sampled_softmax": ["--loss", "sampled_softmax"],
    "sampled_softmax_popularity_in_batch": ["--loss", "sampled_softmax", "--neg_sampler", "popularity",
                                            "--in_batch_negatives"],
    "sampled_softmax_per_position": ["--loss", "sampled_softmax", "--negatives_per_position"],
    "ce": ["--loss", "ce"],
    "schedule": ["--loss_schedule", "bce:1,infonce"],
    "augment_l2_dropout": ["--loss", "infonce", "--augment", "0.1", "--l2_emb", "0.01", "--item_emb_dropout", "0.2"],
    "infonce_amp_bf16": ["--loss", "infonce", "--amp", "bf16"],
    "hstu_position_bias": ["--loss", "infonce", "--encoder", "hstu", "--attn_bias", "position"],
    "sasrec_position_bias": ["--loss", "bce", "--attn_bias", "position"],
}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=200, num_items=150, num_topics=5, seed=1)


def caller():
    """(repository path, qualified function name) of the innermost project frame that asked for a value."""
    frame = sys._getframe(2)  # above counted() and this function
    while frame is not None:
        path = os.path.relpath(frame.f_code.co_filename, ROOT)
        if not path.startswith(("..", "tests")) and ".venv" not in path:
            return path, frame.f_code.co_qualname
        frame = frame.f_back
    return None


@pytest.fixture
def host_reads(monkeypatch):
    """{(file, function): count} of the host reads made by project code while the fixture is active."""
    seen = {}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            site = caller()
            if site is not None:
                seen[site] = seen.get(site, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


@pytest.mark.parametrize("option", OPTIONS, ids=list(OPTIONS))
def test_a_training_step_reads_no_tensor_on_the_host_but_the_known_sites(data, option, host_reads, monkeypatch):
    monkeypatch.setattr(cli, "cpu_bf16_instructions", lambda: ("amx_bf16",))  # --amp bf16 acts on any CPU here
    config, side = run.complete_config(build_config(FLAGS + OPTIONS[option]), data)
    split = LeaveOneOut(data)
    model, loss, sampler, optimizer = run.build(config, side, split, torch.device("cpu"))
    step = loop.make_step(model, loss, sampler, config, torch.device("cpu"))
    batches = TrainBatches(split, config.model.maxlen, config.train.batch_size,
                           sampler=sampler if loss.per_position_negatives else None)
    if hasattr(loss, "epoch"):
        loss.epoch = 2  # the schedule's second stage (infonce)
    for batch in list(batches.epoch(np.random.default_rng(0)))[:2]:  # the second step meets a filled queue
        host_reads.clear()
        out = step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    unknown = {site: n for site, n in host_reads.items() if site not in KNOWN_READS}
    assert not unknown, f"host reads of tensor values in the step, not in KNOWN_READS: {unknown}"


def test_the_counter_sees_a_host_read(host_reads):
    """The patched methods see what they must: a read in project code is attributed to its function."""
    from objectives.negative_queue import NegativeQueue
    queue = NegativeQueue(8, 4)
    queue.push(torch.ones(3, 4), torch.arange(1, 4))
    queue.contents()
    assert any(path == "objectives/negative_queue.py" for path, _ in host_reads)
