"""Training objectives over SASRec's sequence states, chosen by --loss.

bce              one sampled negative per position (the SASRec paper)
gbce             gBCE: N uniform negatives per sequence, positive term raised to beta (Petrov & Macdonald, RecSys 2023)
infonce          softmax over the batch's pool of sampled negatives (masked in-batch InfoNCE)
sampled_softmax  softmax over N shared negatives (uniform or popularity), logQ-corrected, optionally
                 plus the batch's positives as extra negatives (mixed negative sampling, Yi et al. 2019)
ce               full softmax over the whole catalogue (Klenitskiy & Vasilev, RecSys 2023)

Every softmax loss is one function, `softmax_loss`: cross-entropy of the positive (index 0) against
a pool of negatives, where pool entries equal to the row's positive (accidental hits) are masked.
It runs in row chunks with recomputation, so memory is O(chunk x pool), never O(rows x pool).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed

LOSSES = ("bce", "gbce", "infonce", "sampled_softmax", "ce")
SOFTMAX_LOSSES = ("infonce", "sampled_softmax", "ce")
SOFTMAX_CHUNK_ELEMS = 1 << 20  # logits per chunk (4 MB fp32): bounds memory, keeps a chunk in cache
TEMPERATURE_RANGE = (0.01, 1.0)  # a learnable temperature is clamped here (CLIP's bound on 1/T is 100)
STAT_COLUMNS = 4096  # negative logits logged per row at most (the CE pool is the whole catalogue)


# ----------------------------------------------------------------------------- loss functions

def bce_loss(pos_logits, neg_logits, pos_weight=1.0):
    """Sum over real positions of -w log sigmoid(pos) - sum log sigmoid(-neg), divided by the positions.

    neg_logits: (R,) or (R, N); masked entries are -inf and add nothing. pos_weight = gBCE's beta.
    """
    return (pos_weight * F.softplus(-pos_logits).sum() + F.softplus(neg_logits).sum()) / pos_logits.shape[0]


def gbce_beta(num_negatives, num_items, t):
    """gBCE's exponent: beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = the negative sampling rate."""
    alpha = num_negatives / max(1, num_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def softmax_loss(queries, pos_logits, pool, pool_ids, pos_ids, pool_bias=None, hard_negatives=0,
                 chunk_elems=None):
    """Mean cross-entropy of each row's positive against the pool.

    queries (R, D), pool (P, D): row r's negative logits are queries[r] @ pool.T (+ pool_bias).
    pos_logits (R,): already final (bias included). Pool entries whose id equals the row's positive
    are masked. hard_negatives K > 0 keeps only each row's K highest negative logits.
    """
    rows = max(1, (chunk_elems or SOFTMAX_CHUNK_ELEMS) // max(1, len(pool)))
    if 0 < hard_negatives < len(pool):
        total = sum(checkpoint(_hardest_rows, queries[i:i + rows], pos_logits[i:i + rows], pos_ids[i:i + rows], pool,
                               pool_ids, pool_bias, hard_negatives, use_reentrant=False)
                    for i in range(0, len(queries), rows))
        return total / len(queries)
    hit_rows, hit_cols = accidental_hits(pos_ids, pool_ids)
    return ChunkedSoftmaxCE.apply(queries, pos_logits, pool, pool_bias, hit_rows, hit_cols, rows) / len(queries)


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Summed cross-entropy of rows [pos_logits[r], queries[r] @ pool.T + pool_bias], hits masked.

    Runs over row chunks and computes each chunk's gradients inside the forward pass (the loss is a
    scalar, so backward only rescales them): the (R x P) logits never exist at once, each chunk's
    softmax passes stay in cache, and there is no recomputation. Same matmuls as autograd (3), a
    third of the memory traffic; the profile had the R x P elementwise passes above the matmuls.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # under --amp bf16 too: exp / sums in fp32
    def forward(ctx, queries, pos_logits, pool, pool_bias, hit_rows, hit_cols, chunk_rows):
        rows, need_grad = len(queries), any(ctx.needs_input_grad[:3])
        # Per row: the shift (max logit), exp(positive - shift), 1 / sum of exps; per-row work is done once,
        # after the loop, so a chunk costs few ops (the step is bound by per-op overhead at small sizes).
        shift, pos_exp, inv = queries.new_empty(rows), queries.new_empty(rows), queries.new_empty(rows)
        grad_q = torch.empty_like(queries)
        grad_pool_t = pool.new_zeros(pool.shape[1], pool.shape[0])  # (D, P): q.T @ probs beats probs.T @ q
        starts = range(0, rows, chunk_rows)
        hit_bounds = torch.searchsorted(hit_rows, torch.tensor([*starts, rows], device=hit_rows.device)).tolist()
        for i, s in enumerate(starts):
            e = min(s + chunk_rows, rows)
            q = queries[s:e]
            logits = q @ pool.T
            if pool_bias is not None:
                logits += pool_bias
            a, b = hit_bounds[i], hit_bounds[i + 1]
            logits[hit_rows[a:b] - s, hit_cols[a:b]] = float("-inf")
            torch.maximum(logits.amax(dim=1), pos_logits[s:e], out=shift[s:e])
            probs = logits.sub_(shift[s:e, None]).exp_()  # in place: the chunk's logits become exp(logit - shift)
            torch.exp(pos_logits[s:e] - shift[s:e], out=pos_exp[s:e])
            torch.reciprocal(probs.sum(dim=1) + pos_exp[s:e], out=inv[s:e])
            if need_grad:  # d loss / d logit = softmax probability = probs * inv (minus 1 for the positive);
                torch.mm(probs, pool, out=grad_q[s:e])  # inv scales the small (rows x D) factors, not the
                grad_pool_t.addmm_(q.T * inv[s:e], probs)  # (rows x P) matrix
        ctx.save_for_backward(grad_q.mul_(inv[:, None]), pos_exp * inv - 1, grad_pool_t.T)
        return (shift - pos_logits - inv.log()).sum()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_total):
        grad_q, grad_pos, grad_pool = ctx.saved_tensors
        return grad_q * grad_total, grad_pos * grad_total, grad_pool * grad_total, None, None, None, None


def _hardest_rows(queries, pos_logits, pos_ids, pool, pool_ids, pool_bias, hard_negatives):
    logits = queries @ pool.T
    if pool_bias is not None:
        logits = logits + pool_bias
    logits[accidental_hits(pos_ids, pool_ids)] = float("-inf")  # in place: mm / add keep no output for backward
    logits = torch.cat([pos_logits[:, None], logits.topk(hard_negatives, dim=1).values], dim=1)
    return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long), reduction="sum")


def accidental_hits(pos_ids, pool_ids):
    """(rows, columns), rows ascending, where pool_ids[column] == pos_ids[row]. Found by sorting, in
    O((R + P) log P): hits are rare, and comparing the whole R x P grid cost as much as the matmul."""
    order = torch.argsort(pool_ids)
    sorted_ids = pool_ids[order]
    lo = torch.searchsorted(sorted_ids, pos_ids)
    counts = torch.searchsorted(sorted_ids, pos_ids, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(len(pos_ids), device=pos_ids.device), counts)
    first = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)  # each row's run start, shifted
    return rows, order[first + torch.arange(len(rows), device=pos_ids.device)]


class ScaledUnitRows(torch.autograd.Function):
    """scale * x / |x| row-wise (F.normalize(x) * scale, same eps) with a hand-written backward:
    grad_x = scale / |x| * (g - u (g . u)), u = x / |x|. Half the ops of autograd's, which matters
    at this size: the step is bound by per-op overhead, and cosine losses normalise every step."""

    @staticmethod
    def forward(ctx, x, scale):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        y = x * (scale / norm)
        ctx.save_for_backward(y, norm, scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, norm, scale = ctx.saved_tensors
        dot = (grad * y).sum(-1, keepdim=True)  # g . y = scale (g . u)
        grad_x = (grad - y * (dot / scale ** 2)) * (scale / norm) if ctx.needs_input_grad[0] else None
        grad_scale = dot.sum() / scale if ctx.needs_input_grad[1] else None
        return grad_x, grad_scale


def scaled_unit_rows(x, scale=1.0):
    """Rows of x scaled to length `scale` (a float or a 0-dim tensor, e.g. 1 / a learnt temperature)."""
    return ScaledUnitRows.apply(x, torch.as_tensor(scale, dtype=x.dtype, device=x.device))


def infonce_loss(states, pos_emb, neg_emb, pos_ids, neg_ids, temperature, chunk_elems=None):
    """Masked in-batch InfoNCE on cosine logits / T from raw vectors (what Objective computes for
    --loss infonce; standalone for tests that bypass a model)."""
    s = scaled_unit_rows(states, 1 / temperature)  # scale the (R, D) side, not the (R, P) logits
    p, n = scaled_unit_rows(pos_emb), scaled_unit_rows(neg_emb)
    return softmax_loss(s, (s * p).sum(-1), n, neg_ids, pos_ids, chunk_elems=chunk_elems)


# ----------------------------------------------------------------------------- the objective

class Objective(nn.Module):
    """The loss chosen by --loss, with its logit scale (dot product, or cosine / temperature, the
    temperature fixed or learnt) and its negative sampler. A module so a learnt temperature is
    optimised and checkpointed with the model."""

    def __init__(self, args, item_counts):
        super().__init__()
        self.loss, self.cosine, self.l2_emb = args.loss, args.similarity == "cosine", args.l2_emb
        self.num_negatives, self.hard_negatives = args.num_negatives, args.hard_negatives
        self.in_batch, self.logq = args.in_batch_negatives, args.logq_correction
        self.gather_negatives = args.gather_negatives
        self.num_items = len(item_counts) - 1
        self.beta = gbce_beta(args.num_negatives, self.num_items, args.gbce_t)
        log_t = torch.tensor(math.log(args.temperature))
        if args.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
        self.learn_temperature = args.learn_temperature
        # Item 0 is padding. Add-one smoothing keeps every log-probability finite.
        counts = torch.as_tensor(item_counts, dtype=torch.float64) + 1
        counts[0] = 0
        popularity = counts / counts.sum()  # how often an item is some row's positive
        self.popularity_sampler = args.neg_sampler == "popularity" and self.loss == "sampled_softmax"  # gbce: uniform
        sampler = popularity if self.popularity_sampler else (counts > 0) / self.num_items
        self.register_buffer("popularity", popularity.float(), persistent=False)
        self.register_buffer("sampler", sampler.float(), persistent=False)

    def temperature(self):
        if not self.learn_temperature:
            return self.log_temperature.exp()
        lo, hi = TEMPERATURE_RANGE
        return self.log_temperature.clamp(math.log(lo), math.log(hi)).exp()

    def forward(self, model, seq, pos, neg, with_logits=False, stat_rows=256):
        """Loss of one batch, plus detached (positive, negative) logits for logging if `with_logits`.

        seq, pos, neg: (B, W) left-padded item ids; only positions with pos != 0 count. `neg` holds
        one sampled negative per position (bce, and infonce's pool); the other losses draw their own.
        """
        real = pos != 0
        rows = real.view(-1).nonzero().squeeze(1)  # flat (B x W) indices of the real positions
        pos_ids = pos.view(-1)[rows]
        if self.loss == "sampled_softmax":
            neg_ids = self.sample_negatives(self.num_negatives, pos.device)
        elif self.loss == "gbce":
            # (B, N): each sequence its own N, for all its positions. Negatives shared by the whole batch gave
            # every row the same gradient noise (N terms against one positive), and gbce did not train (README).
            neg_ids = self.sample_negatives((len(seq), self.num_negatives), pos.device)
        elif self.loss == "ce":
            neg_ids = torch.arange(1, self.num_items + 1, device=pos.device)
        else:
            neg_ids = neg.view(-1)[rows]
        inputs, pos_emb, neg_emb = self.embed(model, seq, pos_ids, neg_ids)
        # index_select, not states[real]: a boolean index's backward (index_put) took 3x as long on CPU
        states = model.sequence_states(seq, inputs).flatten(0, 1).index_select(0, rows)
        queries = scaled_unit_rows(states, 1 / self.temperature()) if self.cosine else states
        pos_logits = (queries * pos_emb).sum(-1)
        if self.loss == "bce":
            neg_logits = (queries * neg_emb).sum(-1)
            loss = bce_loss(pos_logits, neg_logits)
        elif self.loss == "gbce":  # (B, W, D) x (B, D, N) over the padded grid, then the real rows
            grid = queries.new_zeros(seq.numel(), queries.shape[-1]).index_copy(0, rows, queries).view(*seq.shape, -1)
            hits = neg_ids[rows // seq.shape[1]] == pos_ids[:, None]
            neg_logits = torch.bmm(grid, neg_emb.transpose(1, 2)).flatten(0, 1).index_select(0, rows)
            neg_logits = neg_logits.masked_fill(hits, float("-inf"))
            loss = bce_loss(pos_logits, neg_logits, self.beta)
        else:
            pool, pool_ids, pos_bias = neg_emb, neg_ids, 0.0
            if self.loss == "sampled_softmax" and self.in_batch:
                pool, pool_ids = torch.cat([neg_emb, pos_emb]), torch.cat([neg_ids, pos_ids])
            pool_bias = None
            if self.gather_negatives and self.loss != "ce":  # every rank's pool (DDP); padding has bias -inf
                pool, pool_ids, pool_bias = distributed.gather_pool(pool, pool_ids)
            if self.loss == "sampled_softmax" and self.logq:
                ranks = distributed.world_size() if self.gather_negatives else 1
                in_batch_rows = int((pool_ids != 0).sum()) - ranks * self.num_negatives if self.in_batch else 0
                log_q = self.log_expected_count(in_batch_rows, ranks)
                pos_bias = -log_q[pos_ids]
                pool_bias = -log_q[pool_ids] if pool_bias is None else pool_bias - log_q[pool_ids]
            loss = softmax_loss(queries, pos_logits + pos_bias, pool, pool_ids, pos_ids, pool_bias,
                                self.hard_negatives)
        if self.l2_emb:
            loss = loss + self.l2_emb * sum(e.weight.norm() for e in (model.item_emb, model.out_emb) if e is not None)
        if not with_logits:
            return loss, None
        if self.loss == "gbce":
            return loss, (pos_logits.detach(), neg_logits[:stat_rows][neg_logits[:stat_rows].isfinite()].detach())
        return loss, self.logit_sample(queries, pos_logits, neg_emb, neg_ids, pos_ids, stat_rows)

    def embed(self, model, seq, pos_ids, neg_ids):
        """Item vectors of the inputs, positives and negatives (the latter two unit length for cosine
        logits), from one lookup: each lookup's backward writes a dense (N + 1, D) gradient."""
        tied = model.out_emb is None
        if self.loss == "ce":  # the pool is the whole table: slice it rather than gather it
            table = model.item_embeddings()
            inputs, pos_emb, neg_emb = table[seq] if tied else model.item_vectors(seq), table[pos_ids], table[1:]
            if self.cosine:
                pos_emb, neg_emb = scaled_unit_rows(pos_emb), scaled_unit_rows(neg_emb)
            return inputs, pos_emb, neg_emb
        sizes, shape = [len(pos_ids), neg_ids.numel()], neg_ids.shape  # gbce's negatives are (B, N)
        neg_ids = neg_ids.reshape(-1)
        if tied:
            inputs, targets = model.item_embeddings(torch.cat([seq.reshape(-1), pos_ids, neg_ids])).split(
                [seq.numel(), sum(sizes)])
            inputs = inputs.view(*seq.shape, -1)
        else:
            inputs, targets = model.item_vectors(seq), model.item_embeddings(torch.cat([pos_ids, neg_ids]))
        if self.cosine:  # positives and negatives in one call
            targets = scaled_unit_rows(targets)
        pos_emb, neg_emb = targets.split(sizes)
        return inputs, pos_emb, neg_emb.view(*shape, -1)

    def sample_negatives(self, shape, device):
        """Item ids of `shape` (an int or a tuple) drawn with replacement from the sampler (torch's RNG:
        seeded per epoch, so resumable)."""
        shape = (shape,) if isinstance(shape, int) else shape
        if self.popularity_sampler:
            return torch.multinomial(self.sampler, math.prod(shape), replacement=True).view(shape)
        return torch.randint(1, self.num_items + 1, shape, device=device)

    def log_expected_count(self, batch_rows, ranks=1):
        """log of how often each item is expected in the pool: N q_sampler per rank whose negatives the
        pool holds (+ R q_popularity for R in-batch positives)."""
        expected = ranks * self.num_negatives * self.sampler
        if self.in_batch:
            expected = expected + batch_rows * self.popularity
        return torch.log(expected.clamp_min(1e-30))

    @torch.no_grad()
    def logit_sample(self, queries, pos_logits, neg_emb, neg_ids, pos_ids, rows):
        """All positive logits and the unmasked negative logits of the first `rows` rows, in the loss's
        units (before any logQ correction), so every loss logs comparable statistics."""
        if self.loss == "bce":
            return pos_logits.detach(), (queries[:rows] * neg_emb[:rows]).sum(-1)
        neg_emb, neg_ids = neg_emb[:STAT_COLUMNS], neg_ids[:STAT_COLUMNS]
        neg_logits = (queries[:rows] @ neg_emb.T)[neg_ids[None, :] != pos_ids[:rows, None]]
        return pos_logits.detach(), neg_logits
