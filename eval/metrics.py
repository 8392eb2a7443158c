"""Leave-one-out ranking metrics: full ranking over the catalogue, sampled (100 negatives), popularity baseline."""
import numpy as np
import torch

import distributed
from dataset import LeaveOneOut, left_padded, ragged_positions

HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
SAMPLED_NEGATIVES = 100
MISS = 1 << 40  # rank of a target that cannot be recommended
SCORE_BUDGET = 1 << 25  # scores held at once (users x items), 128 MB fp32


def metrics_from_ranks(ranks, prefix=""):
    """ranks: 0-based rank of each target among its candidates. HR@k, NDCG@k, MRR averaged over users."""
    ranks = np.asarray(ranks, np.float64)
    out = {f"{prefix}HR@{k}": float((ranks < k).mean()) for k in HR_KS}
    gains = 1.0 / np.log2(ranks + 2.0)
    out.update({f"{prefix}NDCG@{k}": float(np.where(ranks < k, gains, 0.0).mean()) for k in NDCG_KS})
    out[f"{prefix}MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


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


def model_scorer(model, data, maxlen, device, cosine=False):
    """score(ends, lengths) -> (B, N + 1) scores of users whose history is items[ends - lengths:ends]."""
    with torch.no_grad():  # the item side once per evaluation, not once per user batch
        items = model.item_embeddings(normalize=cosine)

    def score(ends, lengths):
        lengths = np.minimum(lengths, maxlen)
        seqs = torch.from_numpy(left_padded(data.items, ends, lengths, int(lengths.max()))).to(device)
        with torch.no_grad():
            return (model.user_embeddings(seqs, normalize=cosine) @ items.T).float().cpu()
    return score


def popularity_scorer(counts):
    """Every user gets item counts; equal counts are broken by item index so ties do not flatter the baseline."""
    scores = torch.as_tensor(counts, dtype=torch.float64) - torch.arange(len(counts)) / (len(counts) + 1.0)
    return lambda ends, lengths: scores.expand(len(ends), -1).clone()


def evaluate(score, split: LeaveOneOut, which, exclude_history=True, sampled=False, seed=0, rare_below=0,
             sharded=False):
    """Metrics for `which` in {'valid', 'test'}: full ranking, plus sampled-metric variants if asked, plus
    `rare_*` metrics over the users whose target was seen fewer than `rare_below` times before (cold items).

    sharded: under torchrun each rank scores every N-th batch of users (the batches one process would
    score, so the numbers are the same) and rank 0 gets the metrics; the other ranks get None.
    """
    data = split.data
    users, ends, hist_len, targets = split.eval_arrays(which)
    batch = max(1, SCORE_BUDGET // (data.num_items + 1))
    starts = range(0, len(users), batch)
    if sharded:
        starts = starts[distributed.rank()::distributed.world_size()]
    ranks, sampled_ranks = {}, {}
    for s in starts:
        b_users, b_ends, b_len, b_tgt = users[s:s + batch], ends[s:s + batch], hist_len[s:s + batch], targets[s:s + batch]
        scores = score(b_ends, b_len)
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
    out["users"] = int(len(users))
    return out


def _sampled_ranks(scores, split, users, targets, rng):
    """SASRec-paper protocol: rank the target among 100 random items the user has not trained on."""
    n = split.data.num_items
    neg = rng.integers(1, n + 1, size=(len(users), SAMPLED_NEGATIVES))
    for _ in range(50):
        clash = split.in_history(users, neg) | (neg == targets[:, None])
        if not clash.any():
            break
        neg[clash] = rng.integers(1, n + 1, size=int(clash.sum()))
    target_scores = scores[torch.arange(len(users)), torch.from_numpy(targets)]
    return (scores.gather(1, torch.from_numpy(neg)) >= target_scores[:, None]).sum(1).numpy()
