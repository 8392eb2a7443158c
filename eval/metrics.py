"""Leave-one-out ranking metrics: full ranking over the catalogue, sampled (100 negatives), popularity baseline;
and the one loop that embeds users (user_batches), for validation, eval/infer.py and eval/competition.py."""
import sys
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

import distributed
from dataset import LeaveOneOut, history_batch, length_batches, ragged_positions
from objectives.samplers import NegativeSampler

HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
SAMPLED_NEGATIVES = 100
MISS = 1 << 40  # rank of a target that cannot be recommended
MEMORY_BUDGET = 1 << 25  # floats an evaluation batch holds at once (scores + encoding), 128 MB fp32
SCORE_HR, SCORE_NDCG = 0.31, 0.69  # the TAAC 2025 competition score: 0.31 HR@10 + 0.69 NDCG@10


def encode_floats(model_config, width):
    """Floats that encoding one user's history of `width` items holds at once: attention (heads x W x W,
    about three copies: mask, weights, softmax) and activations (W x a few times D)."""
    w = min(width, model_config.maxlen)
    return w * (3 * model_config.num_heads * w + 8 * model_config.hidden_units)


def users_per_batch(num_items, encode_per_user=0):
    """Users scored at once: their (N + 1) scores and their encoding within MEMORY_BUDGET floats."""
    return max(1, MEMORY_BUDGET // (num_items + 1 + encode_per_user))


# histories(rows, lengths, width): the dataset.Batch, or the (B, width) left-padded item ids, of the users at
# `rows` (an index array), each history its last `lengths` (B,) items.
Histories = Callable[[np.ndarray, np.ndarray, int], object]


@torch.no_grad()
def user_batches(model, histories: Histories, lengths: np.ndarray, device: torch.device, normalize: bool = False,
                 batch_size: Optional[int] = None,
                 item_table: Optional[torch.Tensor] = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The loop that embeds users: yields (rows, (B, D) query vectors on `device`) until every one of the
    len(lengths) users is embedded, users batched by history length (dataset.length_batches), at most
    `batch_size` at a time and fewer where long histories would hold more than MEMORY_BUDGET floats.
    lengths (U,): history lengths (clipped to the model's maxlen here); normalize: unit-length vectors;
    item_table: model.item_table()'s (computed here if None), so the inputs read rows, not the item tower."""
    lengths = np.minimum(lengths, model.config.maxlen)
    fits = MEMORY_BUDGET // encode_floats(model.config, int(lengths.max(initial=1)))
    table = model.item_table() if item_table is None else item_table
    for rows in length_batches(lengths, max(1, min(batch_size or fits, fits))):
        batch = histories(rows, lengths[rows], int(lengths[rows].max())).to(device)
        yield rows, model.user_embeddings(batch, normalize, item_table=table)


def embed_users(model, histories: Histories, lengths: np.ndarray, device: torch.device, normalize: bool = False,
                batch_size: int = 1024) -> np.ndarray:
    """(U, D) float32 query vectors of the U users, in their order, on the CPU (user_batches' loop)."""
    out = np.zeros((len(lengths), model.config.hidden_units), np.float32)
    batches = user_batches(model, histories, lengths, device, normalize, batch_size)
    for rows, vectors in tqdm(batches, desc="users", disable=not sys.stderr.isatty()):
        out[rows] = vectors.float().cpu().numpy()
    return out


def metrics_from_ranks(ranks, prefix=""):
    """ranks: 0-based rank of each target among its candidates. HR@k, NDCG@k, MRR averaged over users."""
    ranks = np.asarray(ranks, np.float64)
    out = {f"{prefix}HR@{k}": float((ranks < k).mean()) for k in HR_KS}
    gains = 1.0 / np.log2(ranks + 2.0)
    out.update({f"{prefix}NDCG@{k}": float(np.where(ranks < k, gains, 0.0).mean()) for k in NDCG_KS})
    out[f"{prefix}MRR"] = float((1.0 / (ranks + 1.0)).mean())
    out[f"{prefix}score"] = SCORE_HR * out[f"{prefix}HR@10"] + SCORE_NDCG * out[f"{prefix}NDCG@10"]
    return out


def weighted_score(ranks, weights):
    """The competition score with each user's target weighted (by its action): 0.31 weighted HR@10 +
    0.69 weighted NDCG@10, each a weighted mean over users. 0 when every weight is 0."""
    ranks, weights = np.asarray(ranks, np.float64), np.asarray(weights, np.float64)
    if weights.sum() <= 0:
        return 0.0
    hit = ranks < 10
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float((SCORE_HR * (weights * hit).sum() + SCORE_NDCG * (weights * ndcg).sum()) / weights.sum())


def metrics_at_k(ranks, k):
    """Metrics from a top-k list: ranks >= k mean "not retrieved". HR@j and NDCG@j (j <= k), MRR@k."""
    ranks = np.where(np.asarray(ranks) < k, ranks, np.inf)
    full = metrics_from_ranks(ranks)
    out = {name: v for name, v in full.items() if "@" in name and int(name.split("@")[1]) <= k}
    out[f"MRR@{k}"] = full["MRR"]
    return out


def full_ranks(scores, targets, exclude_rows=None, exclude_items=None):
    """Rank of each target among all real items; ties count against the target.

    scores: (B, N + 1) float tensor (column 0 is padding and never ranks); modified in place.
    exclude_rows/items: positions (row, item) removed from the ranking, e.g. the user's history. As in
    retrieval with history filtering, an excluded target cannot be recommended: it ranks last (a miss).
    """
    rows = torch.arange(len(targets))
    scores[:, 0] = float("-inf")
    if exclude_rows is not None:
        scores[exclude_rows, exclude_items] = float("-inf")
    target_scores = scores[rows, targets].clone()
    scores[rows, targets] = float("-inf")
    ranks = (scores >= target_scores[:, None]).sum(1)
    return ranks.masked_fill(torch.isneginf(target_scores), MISS)


def model_scorer(model, data, device, cosine=False, predict_action=1):
    """score(users, ends, lengths) -> (B, N + 1) scores of users whose history is items[ends - lengths:ends]
    (with the log's user and event context, the target's timestamp as the prediction time, `predict_action` as
    the action asked for), on the CPU; the
    histories are clipped to model.config.maxlen. The item table is computed once per scorer (one evaluation),
    not once per user batch."""
    table = model.item_table()
    with torch.no_grad():
        items = model.item_embeddings(normalize=cosine, item_table=table)

    def score(users, ends, lengths):
        def histories(rows, clipped, width):
            return history_batch(data, users[rows], ends[rows], clipped, width, predict_action=predict_action)
        queries = items.new_empty(len(users), items.shape[1])
        for rows, vectors in user_batches(model, histories, lengths, device, cosine, len(users), table):
            queries[torch.from_numpy(rows).to(queries.device)] = vectors
        with torch.no_grad():
            return (queries @ items.T).float().cpu()
    return score


def popularity_scorer(counts):
    """Every user gets item counts; equal counts are broken by item index so ties do not flatter the baseline."""
    scores = torch.as_tensor(counts, dtype=torch.float64) - torch.arange(len(counts)) / (len(counts) + 1.0)
    return lambda users, ends, lengths: scores.expand(len(ends), -1).clone()


def evaluate(score, split: LeaveOneOut, which, exclude_history=True, sampled=False, seed=0, rare_below=0,
             sharded=False, encode_cost=None, score_weights=None):
    """Metrics for `which` in {'valid', 'test'}: full ranking, plus sampled-metric variants if asked, plus
    `rare_*` metrics over the users whose target was seen fewer than `rare_below` times before (cold items).

    sharded: under torchrun each rank scores every N-th batch of users (the batches one process would
    score, so the numbers are the same) and rank 0 gets the metrics; the other ranks get None.
    encode_cost(width): floats that encoding one user's history of that width holds (attention and
    activations); users per batch are sized so that scores and encoding stay within MEMORY_BUDGET.
    score_weights {action: weight}: with a log of actions, also the action-weighted competition score.
    Every report has `score` (0.31 HR@10 + 0.69 NDCG@10).
    """
    data = split.data
    # Users in order of history length: each batch is as wide as its longest history, not the log's longest.
    arrays = split.eval_arrays(which)
    by_length = np.argsort(arrays[2], kind="stable")
    users, ends, hist_len, targets = (a[by_length] for a in arrays)
    batch = users_per_batch(data.num_items, encode_cost(int(hist_len.max(initial=1))) if encode_cost else 0)
    starts = range(0, len(users), batch)
    if sharded:
        starts = starts[distributed.rank()::distributed.world_size()]
    ranks, sampled_ranks = {}, {}
    for s in starts:
        b = slice(s, s + batch)
        b_users, b_ends, b_len, b_tgt = users[b], ends[b], hist_len[b], targets[b]
        scores = score(b_users, b_ends, b_len)
        if sampled:  # each batch its own negatives' stream, whichever process scores it
            sampled_ranks[s] = _sampled_ranks(scores, split, b_users, b_tgt, np.random.default_rng([seed, s]))
        rows = items = None
        if exclude_history:
            rows, idx = ragged_positions(b_ends - b_len, b_len)
            rows, items = torch.from_numpy(rows), torch.from_numpy(data.items[idx].astype(np.int64))
        ranks[s] = full_ranks(scores, torch.from_numpy(b_tgt), rows, items).numpy()
    if sharded and distributed.world_size() > 1:  # one gather of every rank's (ranks, sampled ranks)
        parts = distributed.gather_objects((ranks, sampled_ranks))
        if not distributed.is_main():
            return None
        ranks = {k: v for full, _ in parts for k, v in full.items()}
        sampled_ranks = {k: v for _, samp in parts for k, v in samp.items()}
    ranks = np.concatenate([ranks[s] for s in sorted(ranks)])
    out = metrics_from_ranks(ranks)
    if rare_below:
        rare = split.item_counts(which)[targets] < rare_below
        out.update(metrics_from_ranks(ranks[rare], prefix="rare_") if rare.any() else {})
        out["rare_users"] = int(rare.sum())
    if sampled:
        out.update(metrics_from_ranks(np.concatenate([sampled_ranks[s] for s in sorted(sampled_ranks)]),
                                      prefix="sampled_"))
    if data.actions is not None and score_weights is not None:
        out["weighted_score"] = weighted_score(ranks, [score_weights.get(int(a), 1.0) for a in data.actions[ends]])
    out["users"] = int(len(users))
    return out


def _sampled_ranks(scores, split, users, targets, rng):
    """SASRec-paper protocol: rank the target among 100 random items the user has not trained on."""
    sampler = NegativeSampler(split.data.num_items, history=split)
    neg = sampler.draw_host(users, (SAMPLED_NEGATIVES,), rng, avoid=targets)
    target_scores = scores[torch.arange(len(users)), torch.from_numpy(targets)]
    return (scores.gather(1, torch.from_numpy(neg)) >= target_scores[:, None]).sum(1).numpy()
