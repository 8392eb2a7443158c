"""Training objectives: BCE with sampled negatives, and masked in-batch InfoNCE."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

INFONCE_CHUNK_ELEMS = 1 << 24  # logits materialised at once (64 MB fp32); bounds peak memory


def bce_loss(pos_logits, neg_logits):
    """Mean over real positions of BCE(positive, 1) + BCE(negative, 0)."""
    return (F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="sum")
            + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="sum")
            ) / pos_logits.numel()


def infonce_loss(states, pos_emb, neg_emb, pos_ids, neg_ids, temperature, chunk_elems=None):
    """Cross-entropy of each positive (index 0) against the pool of all negatives, on cosine logits / T.

    Rows are the R real positions of the batch (padding never enters); the pool is the R
    negatives sampled for them. A pool entry equal to a row's positive is masked out. Rows are
    processed in chunks with recomputation, so memory is O(chunk x R), not O(R x R).
    """
    s = F.normalize(states, dim=-1) / temperature  # scale the (R, D) side, not the (R, R) logits
    p, n = F.normalize(pos_emb, dim=-1), F.normalize(neg_emb, dim=-1)
    pos_logits = (s * p).sum(-1)
    rows = max(1, (chunk_elems or INFONCE_CHUNK_ELEMS) // max(1, len(n)))
    if rows >= len(s):
        return _infonce_rows(s, pos_logits, n, pos_ids, neg_ids) / len(s)
    total = sum(checkpoint(_infonce_rows, s[i:i + rows], pos_logits[i:i + rows], n, pos_ids[i:i + rows], neg_ids,
                           use_reentrant=False)
                for i in range(0, len(s), rows))
    return total / len(s)


def _infonce_rows(s, pos_logits, n, pos_ids, neg_ids):
    neg_logits = (s @ n.T).masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    return (torch.logaddexp(pos_logits, torch.logsumexp(neg_logits, dim=1)) - pos_logits).sum()


def training_loss(model, seq, pos, neg, args, with_logits=False, stat_rows=256):
    """Loss of one batch, plus detached (positive, negative) logits for logging if `with_logits`.

    seq, pos, neg: (B, W) left-padded item ids; only positions with pos != 0 count.
    """
    real = pos != 0
    states = model.sequence_states(seq)[real]
    pos_ids, neg_ids = pos[real], neg[real]
    # one lookup for both: each embedding backward materialises a dense (N + 1, D) gradient
    pos_emb, neg_emb = model.item_embeddings(torch.cat([pos_ids, neg_ids])).split(len(pos_ids))
    logits = None
    if args.use_infonce:
        loss = infonce_loss(states, pos_emb, neg_emb, pos_ids, neg_ids, args.infonce_temperature)
        if with_logits:
            logits = infonce_logits_sample(states, pos_emb, neg_emb, pos_ids, neg_ids, args.infonce_temperature,
                                           stat_rows)
    else:
        pos_logits = (states * pos_emb).sum(-1)
        neg_logits = (states * neg_emb).sum(-1)
        loss = bce_loss(pos_logits, neg_logits)
        logits = (pos_logits.detach(), neg_logits.detach())
    if args.l2_emb:
        loss = loss + args.l2_emb * model.item_emb.weight.norm()
    return loss, logits


@torch.no_grad()
def infonce_logits_sample(states, pos_emb, neg_emb, pos_ids, neg_ids, temperature, rows):
    """All positive logits and the unmasked negative logits of the first `rows` rows (the full matrix is never kept)."""
    s, p, n = (F.normalize(x, dim=-1) for x in (states, pos_emb, neg_emb))
    neg_logits = (s[:rows] @ n.T)[neg_ids[None, :] != pos_ids[:rows, None]]
    return (s * p).sum(-1) / temperature, neg_logits / temperature
