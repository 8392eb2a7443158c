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


def infonce_loss(states, pos_emb, neg_emb, pos_ids, neg_ids, temperature, chunk_elems=INFONCE_CHUNK_ELEMS):
    """Cross-entropy of each positive (index 0) against the pool of all negatives, on cosine logits / T.

    Rows are the R real positions of the batch (padding never enters); the pool is the R
    negatives sampled for them. A pool entry equal to a row's positive is masked out. Rows are
    processed in chunks with recomputation, so memory is O(chunk x R), not O(R x R).
    """
    s, p, n = (F.normalize(x, dim=-1) for x in (states, pos_emb, neg_emb))
    pos_logits = (s * p).sum(-1) / temperature
    rows = max(1, chunk_elems // max(1, len(n)))
    if rows >= len(s):
        return _infonce_rows(s, pos_logits, n, pos_ids, neg_ids, temperature) / len(s)
    total = sum(checkpoint(_infonce_rows, s[i:i + rows], pos_logits[i:i + rows], n, pos_ids[i:i + rows], neg_ids,
                           temperature, use_reentrant=False)
                for i in range(0, len(s), rows))
    return total / len(s)


def _infonce_rows(s, pos_logits, n, pos_ids, neg_ids, temperature):
    neg_logits = (s @ n.T / temperature).masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    return (torch.logaddexp(pos_logits, torch.logsumexp(neg_logits, dim=1)) - pos_logits).sum()


def training_loss(model, seq, pos, neg, args, stat_rows=256):
    """Loss of one batch plus detached positive / negative logits for logging.

    seq, pos, neg: (B, W) left-padded item ids; only positions with pos != 0 count.
    """
    real = pos != 0
    states = model.sequence_states(seq)[real]
    pos_ids, neg_ids = pos[real], neg[real]
    pos_emb, neg_emb = model.item_embeddings(pos_ids), model.item_embeddings(neg_ids)
    if args.use_infonce:
        loss = infonce_loss(states, pos_emb, neg_emb, pos_ids, neg_ids, args.infonce_temperature)
        with torch.no_grad():  # logit statistics on a row sample: the full matrix is never kept
            s, p, n = (F.normalize(x, dim=-1) for x in (states, pos_emb, neg_emb))
            pos_logits = (s * p).sum(-1) / args.infonce_temperature
            sample = (s[:stat_rows] @ n.T) / args.infonce_temperature
            neg_logits = sample[neg_ids[None, :] != pos_ids[:stat_rows, None]]
    else:
        pos_logits = (states * pos_emb).sum(-1)
        neg_logits = (states * neg_emb).sum(-1)
        loss = bce_loss(pos_logits, neg_logits)
    if args.l2_emb:
        loss = loss + args.l2_emb * model.item_emb.weight.norm()
    return loss, pos_logits.detach(), neg_logits.detach()
