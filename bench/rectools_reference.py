"""eSASRec's SASRec+SS row run with the library it came from: RecTools 0.13.0's SASRecModel at the settings of
blondered/transformer_benchmark's configs/paper/loo/s3_vanilla.yaml, on an S3-Rec file, on the CPU.

    python3 -m venv /tmp/rectools && /tmp/rectools/bin/pip install torch==2.13.0 "rectools[torch]==0.13.0"
    OMP_NUM_THREADS=1 /tmp/rectools/bin/python bench/rectools_reference.py --data ../shared/data/Beauty.txt --epochs 10

RecTools is not a dependency of this repository: this script is the reference that configs/esasrec.toml is
compared with. The protocol is the benchmark's: each user's last item is the test target (users whose target
item never occurs in training count as misses here), the second-last is the validation target, validation
every epoch with the history filtered, and the model of the best validation recall@10 is tested.
One change for CPU time, not for the numbers: the (positions x 257) logits come from one matrix product
against the catalogue and a gather, at real positions only, instead of gathering each position's 257 vectors
(the same values; padding positions are ignored by the loss either way).
"""
import argparse
import copy
import time
import warnings

import numpy as np
import pandas as pd
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import Callback
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import SASRecModel
from rectools.models.nn.transformers.similarity import DistanceSimilarityModule

SETTINGS = dict(n_factors=256, session_max_len=50, n_blocks=1, n_heads=1, dropout_rate=0.2, loss="sampled_softmax",
                n_negatives=256, lr=0.001, batch_size=128)  # s3_vanilla.yaml; RecTools' defaults otherwise


def real_position_logits(self, session_embs, item_embs, candidate_item_ids):
    """RecTools' candidate logits (batch, positions, 1 + negatives), computed densely at real positions."""
    session_embs = session_embs[:, -candidate_item_ids.shape[1]:]  # validation asks for the last position
    real = candidate_item_ids[..., 0] != 0
    logits = session_embs.new_zeros(candidate_item_ids.shape)
    logits[real] = (session_embs[real] @ item_embs.T).gather(-1, candidate_item_ids[real])
    return logits


def read_s3rec(path):
    """'user item item ...' lines -> interactions, each user's events timed 1, 2, ... in line order."""
    rows = []
    with open(path) as f:
        for line in f:
            user, *items = line.split()
            rows += [(int(user), int(item), t) for t, item in enumerate(items, 1)]
    frame = pd.DataFrame(rows, columns=[Columns.User, Columns.Item, Columns.Datetime])
    frame[Columns.Weight] = 1
    return frame


def last_of_each_user(interactions):
    """Boolean mask (in the frame's row order) of every user's latest interaction."""
    newest_first = interactions.sort_values(Columns.Datetime, ascending=False, kind="stable")
    rank = newest_first.groupby(Columns.User, sort=False).cumcount()
    return (rank == 0).reindex(interactions.index).values


class Validation(Callback):
    """HR@10 / NDCG@10 of the validation targets against the whole catalogue, history filtered, every epoch;
    keeps the weights of the best recall@10 (the benchmark's checkpoint rule)."""

    def __init__(self):
        self.ranks, self.best_recall, self.best_state, self.start = [], -1.0, None, time.time()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        users = module.torch_model.encode_sessions(batch, module.item_embs)[:, -1, :]
        scores = users @ module.item_embs.T
        target = scores.gather(1, batch["y"][:, -1:])
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, batch["x"], True)
        seen[:, 0] = True
        ranks = (scores.masked_fill(seen, float("-inf")) > target).sum(1)
        seen_target = seen.gather(1, batch["y"][:, -1:]).squeeze(1)
        self.ranks.append(ranks.masked_fill(seen_target, len(seen[0])))  # a seen target: a miss

    def on_validation_epoch_end(self, trainer, module):
        ranks, self.ranks = torch.cat(self.ranks), []
        if trainer.sanity_checking:
            return
        hit = ranks < 10
        recall, ndcg = hit.float().mean().item(), (hit / torch.log2(ranks.float() + 2)).mean().item()
        loss = trainer.callback_metrics.get("train_loss")
        print(f"epoch {trainer.current_epoch + 1}  valid HR@10 {recall:.4f} NDCG@10 {ndcg:.4f}  train loss "
              f"{float('nan') if loss is None else float(loss):.4f}  users {len(ranks)}  "
              f"{time.time() - self.start:.0f} s", flush=True)
        if recall > self.best_recall:
            self.best_recall, self.best_state = recall, copy.deepcopy(module.state_dict())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an S3-Rec file (user item item ...)")
    p.add_argument("--epochs", type=int, default=200, help="the benchmark's cap is 200 (patience 50 on recall@10)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    DistanceSimilarityModule._get_pos_neg_logits = real_position_logits

    interactions = read_s3rec(args.data)
    is_test = last_of_each_user(interactions)
    test, train = interactions[is_test], interactions[~is_test]
    print(f"{args.data}: {interactions[Columns.User].nunique()} users, {len(test)} test targets", flush=True)
    def trainer():
        return Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, callbacks=[Validation()])

    model = SASRecModel(**SETTINGS, get_val_mask_func=last_of_each_user, get_trainer_func=trainer)
    dataset = Dataset.construct(train)
    model.fit(dataset)
    validation = next(c for c in model.fit_trainer.callbacks if isinstance(c, Validation))  # fit used a copy
    model.lightning_model.load_state_dict(validation.best_state)
    reco = model.recommend(users=test[Columns.User].unique(), dataset=dataset, k=10, filter_viewed=True)
    hits = reco.merge(test[[Columns.User, Columns.Item]], on=[Columns.User, Columns.Item])
    ndcg = (1 / np.log2(hits[Columns.Rank].to_numpy() + 1)).sum() / len(test)
    print(f"test (best validation recall@10 model): HR@10 {len(hits) / len(test):.4f} NDCG@10 {ndcg:.4f}")


if __name__ == "__main__":
    main()
