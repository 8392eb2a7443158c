"""The training loop's loss reduction: how much each trained position weighs in an epoch's gradient."""
import numpy as np
import pytest
import torch

from config import build_config
from conftest import Replay
from dataset import Batch, TrainBatches
from training import loop, run

FLAGS = ["--data", "synthetic", "--device", "cpu", "--loss", "bce", "--dropout_rate", "0", "--hidden_units", "16",
         "--num_blocks", "1", "--maxlen", "20", "--batch_size", "64", "--cache_dir", ""]


class GradientRecorder:
    """An optimizer that keeps each step's gradients and never moves a weight: every step sees the same model."""

    def __init__(self, params):
        self.params, self.param_groups, self.grads = list(params), [{"lr": 0.0}], []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params])

    def total(self):
        return [sum(step[i] for step in self.grads) for i in range(len(self.params))]


def one_batch(batches):
    """All batches as one, left-padded to the widest: the same positions, with the same negatives."""
    width = max(b.inputs.shape[1] for b in batches)
    pad = lambda x: torch.nn.functional.pad(x, (width - x.shape[1], 0))  # noqa: E731
    inputs, positives, negatives = (torch.cat([pad(getattr(b, k)) for b in batches])
                                    for k in ("inputs", "positives", "negatives"))
    rows = (positives != 0).view(-1).nonzero().squeeze(1)
    return Batch(inputs, positives, torch.cat([b.users for b in batches]), rows, negatives)


@pytest.mark.parametrize("reduction, every_position_equal", [("position", True), ("batch", False)])
def test_position_reduction_weighs_every_position_the_same(reduction, every_position_equal):
    """position: an epoch's summed gradient is that of all its positions' summed loss / mean_rows, however
    the positions fall into (length-bucketed) batches; batch: short batches' positions weigh more."""
    config, _, split, model, loss_fn, sampler, _ = run.prepare(
        build_config(FLAGS + ["--loss_reduction", reduction]), torch.device("cpu"))
    bucketed = TrainBatches(split, 20, 64, sampler=sampler)
    batches = list(bucketed.epoch(np.random.default_rng(0)))[:4]
    rows = [len(b.rows) for b in batches]
    assert max(rows) > 1.5 * min(rows)  # batches of different lengths, or the test shows nothing
    mean_rows = sum(rows) / len(rows)
    step = loop.make_step(model, loss_fn, sampler, config, torch.device("cpu"))

    recorder = GradientRecorder(model.parameters())
    loop.train_epoch(step, recorder, Replay(batches, mean_rows), config, torch.device("cpu"), loop.LoopState(),
                      loop.NullWriter(), loop.GracefulStop())
    model.zero_grad()
    everything = one_batch(batches)
    (step(everything).loss * len(everything.rows) / mean_rows).backward()  # mean over all positions x their count

    got = dict(zip([name for name, _ in model.named_parameters()], recorder.total(), strict=True))
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    table = "item_tower.id_emb.weight"
    assert expected[table].abs().sum() > 0
    if every_position_equal:
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    else:
        assert not torch.allclose(got[table], expected[table], rtol=1e-2)
