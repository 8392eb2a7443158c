"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: a few DDP training steps through
loop.train_epoch, then each rank saves what the test checks (weights, the batches it trained on, the loss,
a sharded validation, and gather_pool results) to OUT/rank<r>.pt.
Usage: torchrun ... ddp_worker.py OUT [main.py flags]."""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
from config import build_config  # noqa: E402
from dataset import TrainBatches  # noqa: E402
from eval import metrics  # noqa: E402
from training import loop, run  # noqa: E402

STEPS = 3
EVAL_BATCH = 500  # users per score batch in the sharded validation


class FirstSteps:
    """The first STEPS batches of a TrainBatches epoch, remembered for the single-process replay."""

    def __init__(self, batches):
        self.batches, self.seen = batches, []

    def __len__(self):
        return STEPS

    def epoch(self, rng):
        for batch in itertools.islice(self.batches.epoch(rng), STEPS):
            self.seen.append(batch)
            yield batch


def gather_checks():
    """gather_pool on uneven (3 + rank rows) and even (4 rows) pools, and the gradient it sends back."""
    r, world = distributed.rank(), distributed.world_size()
    uneven = torch.full((3 + r, 2), float(r + 1), requires_grad=True)
    pool, ids, bias = distributed.gather_pool(uneven, torch.arange(1, 4 + r))
    weights = torch.arange(1.0, len(pool) + 1)[:, None] * (r + 1)  # rank r's loss: sum(weights * pool)
    (weights * pool).sum().backward()
    even_pool, _, even_bias = distributed.gather_pool(torch.ones(4, 2), torch.arange(1, 5))
    return {"uneven_pool": pool.detach(), "uneven_ids": ids, "uneven_bias": bias, "uneven_grad": uneven.grad,
            "even_rows": len(even_pool), "even_bias_is_none": even_bias is None, "world": world}


def train_and_save(out, argv):
    config = build_config(argv)
    device = distributed.init(torch.device("cpu"))
    torch.manual_seed(config.train.seed)
    config, data, split, model, loss_fn, sampler, optimizer = run.prepare(config, device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = FirstSteps(TrainBatches(split, config.model.maxlen, config.train.batch_size, rank=distributed.rank(),
                                      world=distributed.world_size(), sampler=sampler))
    step = loop.make_step(model, loss_fn, sampler, config, device)
    loss, _, _ = loop.train_epoch(step, optimizer, batches, config, device, loop.LoopState(), loop.NullWriter(),
                                   loop.GracefulStop())
    metrics.users_per_batch = lambda *sizes: EVAL_BATCH  # several score batches, so each rank gets some
    valid = loop.run_evaluation(model, split, config, device, "valid", sharded=True)
    torch.save({"initial": initial, "final": model.state_dict(), "loss": loss, "valid": valid,
                "batches": [{"users": b.users, "seq": b.inputs, "pos": b.positives, "neg": b.negatives}
                            for b in batches.seen],
                **gather_checks()}, os.path.join(out, f"rank{distributed.rank()}.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    train_and_save(sys.argv[1], sys.argv[2:])
