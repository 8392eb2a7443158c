"""Training losses over the states of a batch's real positions, one class each, chosen by --loss.

bce              one sampled negative per position (the SASRec paper)
gbce             gBCE: N uniform negatives per sequence, positive term raised to beta (Petrov & Macdonald, RecSys 2023)
infonce          softmax over the batch's pool of sampled negatives (masked in-batch InfoNCE)
sampled_softmax  softmax over N shared negatives (uniform or popularity), logQ-corrected, optionally
                 plus the batch's positives as extra negatives (mixed negative sampling, Yi et al. 2019);
                 --negatives_per_position: N uniform negatives for every position instead (RecTools, eSASRec)
ce               full softmax over the whole catalogue (Klenitskiy & Vasilev, RecSys 2023)

Every loss is called as `loss(states, pos_ids, tower, negatives, with_logits, weights)`:
    states (R, D)   states of the R real positions      pos_ids (R,)   their next items
    tower           model.ItemTower: ids -> vectors     negatives      samplers.BatchNegatives
                    (tower() the whole (N + 1, D) table)
    weights (R,)    each row's weight (--action_weights by the target's action), None: all 1; the loss is
                    then sum(w_r loss_r) / sum(w_r)
and returns a LossOutput (the scalar loss; with_logits: detached positive / negative logits to log).
The softmax losses share `softmax_loss`: cross-entropy of the positive (index 0) against a pool of
negatives, where pool entries equal to the row's positive (accidental hits) are masked, in row chunks,
so memory is O(chunk x pool), never O(rows x pool).
"""
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed
from config import LOSSES, TEMPERATURE_RANGE, loss_stages
from objectives.negative_queue import NegativeQueue

if TYPE_CHECKING:
    from model import ItemTower
    from objectives.samplers import BatchNegatives

SOFTMAX_CHUNK_ELEMS = 1 << 20  # logits per chunk (4 MB fp32): bounds memory, keeps a chunk in cache
STAT_ROWS, STAT_COLUMNS = 256, 4096  # logits logged at most (the CE pool is the whole catalogue)


# ----------------------------------------------------------------------------- loss functions

def bce_loss(pos_logits, neg_logits, pos_weight=1.0, weights=None):
    """Sum over real positions of -b log sigmoid(pos) - sum log sigmoid(-neg), divided by the positions.

    neg_logits: (R,) or (R, N); masked entries are -inf and add nothing. pos_weight b = gBCE's beta.
    weights (R,): the rows' weights (the sum is weighted, and divided by the weights' sum).
    """
    if weights is None:
        return (pos_weight * F.softplus(-pos_logits).sum() + F.softplus(neg_logits).sum()) / pos_logits.shape[0]
    neg = F.softplus(neg_logits)
    per_row = pos_weight * F.softplus(-pos_logits) + (neg.sum(-1) if neg.dim() > 1 else neg)
    return (weights * per_row).sum() / weights.sum()


def gbce_beta(num_negatives, num_items, t):
    """gBCE's exponent: beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = the negative sampling rate."""
    alpha = num_negatives / max(1, num_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def softmax_loss(queries, pos_logits, pool, pool_ids, pos_ids, pool_bias=None, hard_negatives=0,
                 chunk_elems=None, weights=None, matmul_dtype=None):
    """Mean cross-entropy of each row's positive against the pool (weighted mean with `weights` (R,)).

    queries (R, D), pool (P, D): row r's negative logits are queries[r] @ pool.T (+ pool_bias).
    pos_logits (R,): already final (bias included). Pool entries whose id equals the row's positive
    are masked. hard_negatives K > 0 keeps only each row's K highest negative logits. matmul_dtype
    (--amp bf16): the pool matmuls' input dtype (not with hard_negatives, which stays fp32).
    """
    rows = max(1, (chunk_elems or SOFTMAX_CHUNK_ELEMS) // max(1, len(pool)))
    total_weight = len(queries) if weights is None else weights.sum()
    if 0 < hard_negatives < len(pool):
        w = weights if weights is not None else queries.new_ones(len(queries))
        total = sum(checkpoint(_hardest_rows, queries[i:i + rows], pos_logits[i:i + rows], pos_ids[i:i + rows], pool,
                               pool_ids, pool_bias, hard_negatives, w[i:i + rows], use_reentrant=False)
                    for i in range(0, len(queries), rows))
        return total / total_weight
    hit_rows, hit_cols = accidental_hits(pos_ids, pool_ids)
    total = ChunkedSoftmaxCE.apply(queries, pos_logits, pool, pool_bias, hit_rows, hit_cols, rows, weights,
                                   matmul_dtype)
    return total / total_weight


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Summed cross-entropy of rows [pos_logits[r], queries[r] @ pool.T + pool_bias], hits masked (each
    row's term times weights[r] when weights are given).

    Runs over row chunks and computes each chunk's gradients inside the forward pass (the loss is a
    scalar, so backward only rescales them): the (R x P) logits never exist at once, each chunk's
    softmax passes stay in cache, and there is no recomputation. Same matmuls as autograd (3), a
    third of the memory traffic; the profile had the R x P elementwise passes above the matmuls.
    """

    @staticmethod
    def forward(ctx, queries, pos_logits, pool, pool_bias, hit_rows, hit_cols, chunk_rows, weights=None,
                matmul_dtype=None):
        """matmul_dtype (--amp bf16): the three matmuls' operands in that dtype, on a CPU padded to a few sizes
        (oneDNN compiles a bf16 matmul kernel per new shape, ~20 ms each, and pools change size every step);
        the logits, exps and sums stay fp32."""
        (rows, dim), pool_rows, need_grad = queries.shape, len(pool), any(ctx.needs_input_grad[:3])
        low = matmul_dtype not in (None, queries.dtype)
        size = padded_size if low and queries.device.type == "cpu" else int
        pool_mm = padded(pool, size(pool_rows), matmul_dtype)
        # Per row: the shift (max logit), exp(positive - shift), 1 / sum of exps; per-row work is done once,
        # after the loop, so a chunk costs few ops (the step is bound by per-op overhead at small sizes).
        shift, pos_exp, inv = queries.new_empty(rows), queries.new_empty(rows), queries.new_empty(rows)
        grad_q = torch.empty_like(queries)
        grad_pool_t = pool.new_zeros(dim, len(pool_mm))  # (D, P): q.T @ probs beats probs.T @ q
        for s in range(0, rows, chunk_rows):
            e = min(s + chunk_rows, rows)
            q = padded(queries[s:e], size(e - s), matmul_dtype)
            padded_logits = (q @ pool_mm.T).to(queries.dtype)  # no copy without --amp
            logits = padded_logits[:e - s, :pool_rows]
            if pool_bias is not None:
                logits += pool_bias
            mask_hits(logits, hit_rows - s, hit_cols)
            torch.maximum(logits.amax(dim=1), pos_logits[s:e], out=shift[s:e])
            probs = logits.sub_(shift[s:e, None]).exp_()  # in place: the chunk's logits become exp(logit - shift)
            torch.exp(pos_logits[s:e] - shift[s:e], out=pos_exp[s:e])
            torch.reciprocal(probs.sum(dim=1) + pos_exp[s:e], out=inv[s:e])
            scale = inv[s:e] if weights is None else inv[s:e] * weights[s:e]
            if need_grad and not low:  # d loss / d logit = softmax probability = probs * inv (minus 1 for the
                torch.mm(probs, pool, out=grad_q[s:e])  # positive); inv scales the small (rows x D) factors,
                grad_pool_t.addmm_(q.T * scale, probs)  # not the (rows x P) matrix
            elif need_grad:  # the padding's probabilities are 0, so it adds nothing
                padded_logits[e - s:], padded_logits[:, pool_rows:] = 0, 0
                probs = padded_logits.to(matmul_dtype)
                grad_q[s:e] = (probs @ pool_mm)[:e - s]
                grad_pool_t += (q.T * padded(scale, len(q), matmul_dtype)) @ probs
        grad_pool = grad_pool_t.T[:pool_rows]
        if weights is None:
            ctx.save_for_backward(grad_q.mul_(inv[:, None]), pos_exp * inv - 1, grad_pool)
            return (shift - pos_logits - inv.log()).sum()
        ctx.save_for_backward(grad_q.mul_((inv * weights)[:, None]), (pos_exp * inv - 1) * weights, grad_pool)
        return ((shift - pos_logits - inv.log()) * weights).sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad_q, grad_pos, grad_pool = ctx.saved_tensors
        return grad_q * grad_total, grad_pos * grad_total, grad_pool * grad_total, None, None, None, None, None, None


def mask_hits(logits, rows, cols):
    """logits[rows, cols] = -inf for the hits whose row falls in 0..len(logits) - 1, without asking the host which
    those are (that read would stall a GPU every step): the others add 0 at a clamped row instead."""
    inside = (rows >= 0) & (rows < len(logits))
    logits.index_put_((rows.clamp(0, len(logits) - 1), cols),
                      torch.where(inside, float("-inf"), 0.0).to(logits.dtype), accumulate=True)


def padded_size(n):
    """n rounded up to a multiple of 1/8 of its power of two: 8 sizes an octave, at most 12.5% padding."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def padded(x, rows, dtype=None):
    """x in `dtype` with zero rows appended up to `rows`; x itself when nothing changes."""
    dtype = dtype or x.dtype
    if rows == len(x) and dtype == x.dtype:
        return x
    out = x.new_zeros((rows, *x.shape[1:]), dtype=dtype)
    out[:len(x)] = x
    return out


def _hardest_rows(queries, pos_logits, pos_ids, pool, pool_ids, pool_bias, hard_negatives, weights):
    logits = queries @ pool.T
    if pool_bias is not None:
        logits = logits + pool_bias
    logits[accidental_hits(pos_ids, pool_ids)] = float("-inf")  # in place: mm / add keep no output for backward
    logits = torch.cat([pos_logits[:, None], logits.topk(hard_negatives, dim=1).values], dim=1)
    per_row = F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long), reduction="none")
    return (per_row * weights).sum()


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



# ----------------------------------------------------------------------------- logits

class ScaledUnitRows(torch.autograd.Function):
    """scale * x / |x| row-wise (F.normalize(x) * scale, same eps) with a hand-written backward:
    grad_x = scale / |x| * (g - u (g . u)), u = x / |x|. Half the ops of autograd's; the step is bound by
    per-op overhead at these sizes. Why it stays: F.normalize instead made an InfoNCE epoch measurably slower
    (figures in docs/performance.md, "Standard calls, and the three tricks that stay")."""

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


class Similarity(nn.Module):
    """How states and item vectors become logits: dot products, or cosines / temperature. A learnt
    temperature is log-parameterised and clamped to TEMPERATURE_RANGE; a fixed one is a buffer.
    matmul_dtype: the softmax pool's matmul inputs (bf16 under --amp bf16; None: as they come, fp32)."""

    def __init__(self, cosine, temperature=1.0, learn=False, matmul_dtype=None):
        super().__init__()
        self.cosine, self.learn, self.matmul_dtype = cosine, learn, matmul_dtype
        log_t = torch.tensor(math.log(temperature))
        if learn:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)

    def temperature(self):
        if not self.learn:
            return self.log_temperature.exp()
        lo, hi = TEMPERATURE_RANGE
        return self.log_temperature.clamp(math.log(lo), math.log(hi)).exp()

    def queries(self, states):
        """(R, D) states -> query vectors: a row's logits are query . item vector."""
        return scaled_unit_rows(states, 1 / self.temperature()) if self.cosine else states

    def items(self, vectors):
        return scaled_unit_rows(vectors) if self.cosine else vectors


@dataclass
class LossOutput:
    loss: torch.Tensor
    pos_logits: Optional[torch.Tensor] = None  # detached, (R,)
    neg_logits: Optional[torch.Tensor] = None  # detached, unmasked negatives of up to STAT_ROWS rows
    augment_loss: Optional[torch.Tensor] = None  # auxiliary terms (unweighted), when on
    align_loss: Optional[torch.Tensor] = None


class Loss(nn.Module):
    """Base of the losses: holds the similarity. `per_position_negatives`: batches must carry one sampled
    negative per real position (drawn with the batch, outside the user's history)."""
    per_position_negatives = False

    def __init__(self, similarity):
        super().__init__()
        self.similarity = similarity

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, tower: "ItemTower", negatives: "BatchNegatives",
                with_logits: bool = False, weights: Optional[torch.Tensor] = None) -> LossOutput:
        """states (R, D): the R real positions' states; pos_ids (R,): their next items; tower: item ids -> vectors
        (tower() the whole (N + 1, D) table); negatives: the batch's draws; weights (R,) or None (all 1).
        Returns the scalar loss sum_r(w_r loss_r) / sum_r(w_r); with_logits: also detached positive (R,) and
        negative logits to log."""
        raise NotImplementedError

    def targets(self, tower, ids):
        """Item vectors of `ids` (any shape) as the logits use them, from one lookup."""
        return self.similarity.items(tower(ids))


class BCE(Loss):
    per_position_negatives = True

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, tower: "ItemTower", negatives: "BatchNegatives",
                with_logits: bool = False, weights: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss.forward; negatives.per_position (R,): each row's one negative, logged as (R,) logits."""
        q = self.similarity.queries(states)
        pos, neg = self.targets(tower, torch.cat([pos_ids, negatives.per_position])).split(len(pos_ids))
        pos_logits, neg_logits = (q * pos).sum(-1), (q * neg).sum(-1)
        out = LossOutput(bce_loss(pos_logits, neg_logits, weights=weights))
        if with_logits:
            out.pos_logits, out.neg_logits = pos_logits.detach(), neg_logits[:STAT_ROWS].detach()
        return out


class GBCE(Loss):
    """gBCE over N uniform negatives per sequence (every position of a sequence shares them); negatives
    shared by the whole batch gave every row the same gradient noise, and gbce did not train."""

    def __init__(self, similarity, num_negatives, num_items, t):
        super().__init__(similarity)
        self.num_negatives, self.beta = num_negatives, gbce_beta(num_negatives, num_items, t)

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, tower: "ItemTower", negatives: "BatchNegatives",
                with_logits: bool = False, weights: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss.forward; negatives.shape (B, W) and rows (R,) place the rows in their sequences, each sequence
        drawing (N,) negatives; logged negative logits: up to STAT_ROWS x N, masked hits left out."""
        (B, W), rows = negatives.shape, negatives.rows
        neg_ids = negatives.draw((B, self.num_negatives), states.device)
        q = self.similarity.queries(states)
        pos, neg = self.targets(tower, torch.cat([pos_ids, neg_ids.view(-1)])).split(
            [len(pos_ids), neg_ids.numel()])
        pos_logits = (q * pos).sum(-1)
        # (B, W, D) x (B, D, N) over the padded grid, then the real rows: no (R, N, D) gather
        grid = q.new_zeros(B * W, q.shape[-1]).index_copy(0, rows, q).view(B, W, -1)
        neg_logits = torch.bmm(grid, neg.view(B, self.num_negatives, -1).transpose(1, 2)).flatten(0, 1)
        hits = neg_ids[negatives.sequence_of_row] == pos_ids[:, None]
        neg_logits = neg_logits.index_select(0, rows).masked_fill(hits, float("-inf"))
        out = LossOutput(bce_loss(pos_logits, neg_logits, self.beta, weights))
        if with_logits:
            sample = neg_logits[:STAT_ROWS].detach()
            out.pos_logits, out.neg_logits = pos_logits.detach(), sample[sample.isfinite()]
        return out


class SoftmaxLoss(Loss):
    """Cross-entropy of each positive against a pool; subclasses say what the pool is."""

    def __init__(self, similarity, hard_negatives=0, gather_negatives=False, queue=None):
        super().__init__(similarity)
        self.hard_negatives, self.gather_negatives, self.queue = hard_negatives, gather_negatives, queue

    def pool(self, pos_ids, tower, negatives, device):
        """(pos vectors (R, D), pool vectors (P, D), pool ids (P,), pos bias, pool bias (P,) or None)."""
        raise NotImplementedError

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, tower: "ItemTower", negatives: "BatchNegatives",
                with_logits: bool = False, weights: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss.forward; the pool (P, D) comes from pool(); logged negative logits: up to STAT_ROWS x
        STAT_COLUMNS of the pool, the rows' positives left out."""
        q = self.similarity.queries(states)
        pos, pool, pool_ids, pos_bias, pool_bias = self.pool(pos_ids, tower, negatives, states.device)
        pos_logits = (q * pos).sum(-1)
        out = LossOutput(self.combine(softmax_loss(q, pos_logits + pos_bias, pool, pool_ids, pos_ids, pool_bias,
                                                   self.hard_negatives, weights=weights,
                                                   matmul_dtype=self.similarity.matmul_dtype),
                                      q, pos, pos_logits, pos_ids, weights))
        if with_logits:  # in the loss's units, before any logQ correction
            with torch.no_grad():
                sample = q[:STAT_ROWS] @ pool[:STAT_COLUMNS].T
                keep = pool_ids[None, :STAT_COLUMNS] != pos_ids[:STAT_ROWS, None]
                out.pos_logits, out.neg_logits = pos_logits.detach(), sample[keep]
        return out

    def combine(self, loss, queries, pos, pos_logits, pos_ids, weights):
        """The loss from the batch's other terms (a subclass may add a direction); here, as it is."""
        return loss

    def gathered(self, pool, pool_ids):
        """Every rank's pool under torchrun with --gather_negatives (padding has bias -inf), else this one's."""
        if self.gather_negatives:
            return distributed.gather_pool(pool, pool_ids)
        return pool, pool_ids, None

    def queued(self, pool, pool_ids, pool_bias):
        """The pool with the --negative_queue entries appended (this step's pool joins the queue)."""
        return (pool, pool_ids, pool_bias) if self.queue is None else self.queue.extend(pool, pool_ids, pool_bias)


class InfoNCE(SoftmaxLoss):
    """The pool is the batch's per-position negatives (each drawn outside its own user's history).
    symmetric: also the item-to-sequence direction (each positive item against every state of the batch,
    states whose positive is the same item masked), and the loss is the mean of the two directions."""
    per_position_negatives = True

    def __init__(self, similarity, hard_negatives=0, gather_negatives=False, queue=None, symmetric=False):
        super().__init__(similarity, hard_negatives, gather_negatives, queue)
        self.symmetric = symmetric

    def combine(self, loss, queries, pos, pos_logits, pos_ids, weights):
        if not self.symmetric:
            return loss
        # pos (unit) against queries (states scaled by 1 / T): the same cos / T logits, read column-wise
        return (loss + softmax_loss(pos, pos_logits, queries, pos_ids, pos_ids, weights=weights,
                                    matmul_dtype=self.similarity.matmul_dtype)) / 2

    def pool(self, pos_ids, tower, negatives, device):
        pos, neg = self.targets(tower, torch.cat([pos_ids, negatives.per_position])).split(len(pos_ids))
        pool, pool_ids, pool_bias = self.queued(*self.gathered(neg, negatives.per_position))
        return pos, pool, pool_ids, 0.0, pool_bias


class SampledSoftmax(SoftmaxLoss):
    """N negatives shared by the batch, drawn by the sampler (uniform or popularity), optionally plus the
    batch's positives (in-batch), every logit shifted by -log(expected count in the pool) (logQ)."""

    def __init__(self, similarity, num_negatives, popularity, in_batch=False, logq=True, hard_negatives=0,
                 gather_negatives=False, queue=None):
        super().__init__(similarity, hard_negatives, gather_negatives, queue)
        self.num_negatives, self.in_batch, self.logq = num_negatives, in_batch, logq
        self.register_buffer("popularity", torch.as_tensor(popularity, dtype=torch.float32), persistent=False)

    def pool(self, pos_ids, tower, negatives, device):
        neg_ids = negatives.draw(self.num_negatives, device)
        pos, neg = self.targets(tower, torch.cat([pos_ids, neg_ids])).split([len(pos_ids), len(neg_ids)])
        pool, pool_ids = (torch.cat([neg, pos]), torch.cat([neg_ids, pos_ids])) if self.in_batch else (neg, neg_ids)
        pool, pool_ids, pool_bias = self.gathered(pool, pool_ids)
        ranks = distributed.world_size() if self.gather_negatives else 1
        # a 0-d tensor, not an int: reading the count on the host would stall a GPU every step
        in_batch_rows = (pool_ids != 0).sum() - ranks * self.num_negatives if self.in_batch else 0
        pool, pool_ids, pool_bias = self.queued(pool, pool_ids, pool_bias)
        if not self.logq:
            return pos, pool, pool_ids, 0.0, pool_bias
        log_q = self.log_expected_count(negatives.sampler, in_batch_rows, ranks)
        pool_bias = -log_q[pool_ids] if pool_bias is None else pool_bias - log_q[pool_ids]
        return pos, pool, pool_ids, -log_q[pos_ids], pool_bias

    def log_expected_count(self, sampler, batch_rows, ranks=1):
        """log of how often each item is expected in the pool: N q_sampler per rank whose negatives the
        pool holds (q_sampler: uniform, or (count + 1) ^ alpha normalised), + R q_popularity for R in-batch
        positives (their empirical share, alpha 1, whatever the sampler's alpha)."""
        expected = sampler.expected_counts(ranks * self.num_negatives, self.popularity.device)
        if self.in_batch:
            expected = expected + batch_rows * self.popularity
        return torch.log(expected.clamp_min(1e-30))


class PerPositionSampledSoftmax(Loss):
    """Sampled softmax over N uniform negatives drawn for every real position (as RecTools and eSASRec draw
    them), accidental hits masked; the sampling is uniform, so logQ is one constant and cancels.

    Two routes to the (R, N) negative logits, in row chunks. A catalogue of at most DENSE_ITEMS_PER_NEGATIVE
    x N items: each chunk's logits against the whole table, then each row's N picked (autograd keeps only
    the picked ones). Why: on Beauty-sized catalogues that is several times faster than gathering each
    row's vectors (bench/per_position_speed.py; figures in docs/results.md, "eSASRec's SASRec + SS protocol
    with per-position negatives"). A larger catalogue: each row's N vectors gathered, recomputed in
    backward (checkpointing), so memory holds one chunk's (rows x N x D) vectors, never R x N x D."""
    DENSE_ITEMS_PER_NEGATIVE = 64

    def __init__(self, similarity, num_negatives, chunk_elems=None):
        super().__init__(similarity)
        self.num_negatives, self.chunk_elems = num_negatives, chunk_elems or SOFTMAX_CHUNK_ELEMS

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, tower: "ItemTower", negatives: "BatchNegatives",
                with_logits: bool = False, weights: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss.forward; each row draws (N,) negatives; logged negative logits: up to STAT_ROWS x N, masked
        hits left out."""
        q = self.similarity.queries(states)
        pos_logits = (q * self.targets(tower, pos_ids)).sum(-1)
        neg_ids = negatives.draw((len(pos_ids), self.num_negatives), states.device)
        if tower.num_items <= self.DENSE_ITEMS_PER_NEGATIVE * self.num_negatives:
            table = self.similarity.items(tower())
            rows = max(1, self.chunk_elems // len(table))
            per_row = torch.cat([self.row_losses(q[i:i + rows], pos_logits[i:i + rows], pos_ids[i:i + rows],
                                                 neg_ids[i:i + rows], table=table) for i in range(0, len(q), rows)])
        else:
            rows = max(1, self.chunk_elems // (self.num_negatives * q.shape[1]))
            per_row = torch.cat([checkpoint(self.row_losses, q[i:i + rows], pos_logits[i:i + rows],
                                            pos_ids[i:i + rows], neg_ids[i:i + rows], tower, use_reentrant=False)
                                 for i in range(0, len(q), rows)])
        loss = per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum()
        out = LossOutput(loss)
        if with_logits:
            with torch.no_grad():
                out.pos_logits = pos_logits.detach()
                out.neg_logits = self.negative_logits(q[:STAT_ROWS], pos_ids[:STAT_ROWS], neg_ids[:STAT_ROWS],
                                                      tower).flatten()
                out.neg_logits = out.neg_logits[out.neg_logits.isfinite()]
        return out

    def negative_logits(self, q, pos_ids, neg_ids, tower=None, table=None):
        """(rows, N) logits of each row's own negatives (vectors from the tower, or picked from the whole
        table's logits); a negative equal to the row's positive is -inf."""
        if table is None:
            logits = torch.einsum("rd,rnd->rn", q, self.targets(tower, neg_ids))
        else:
            logits = (q @ table.T).gather(1, neg_ids)
        return logits.masked_fill(neg_ids == pos_ids[:, None], float("-inf"))

    def row_losses(self, q, pos_logits, pos_ids, neg_ids, tower=None, table=None):
        logits = torch.cat([pos_logits[:, None], self.negative_logits(q, pos_ids, neg_ids, tower, table)], 1)
        return torch.logsumexp(logits, 1) - pos_logits


class FullCE(SoftmaxLoss):
    """The pool is the whole catalogue: the tower's table sliced, not gathered."""

    def pool(self, pos_ids, tower, negatives, device):
        table = self.similarity.items(tower())
        return table[pos_ids], table[1:], torch.arange(1, len(table), device=device), 0.0, None


class ScheduledLoss(nn.Module):
    """Multi-stage training (--loss_schedule 'bce:5,infonce'): stage k's loss trains its epochs, the last
    stage every epoch after. The stage is a function of the epoch, so a resumed run picks it up; every stage
    shares one Similarity (what retrieval ranks by) and the negative queue, if any."""

    def __init__(self, stages):
        """stages: (name, loss module, epochs or None for the last) in order."""
        super().__init__()
        self.names = [name for name, _, _ in stages]
        self.stages = nn.ModuleList(loss for _, loss, _ in stages)
        self.ends = list(itertools.accumulate(epochs or math.inf for _, _, epochs in stages))
        self.similarity = self.stages[0].similarity
        self.per_position_negatives = any(loss.per_position_negatives for loss in self.stages)
        self.epoch = 1

    def stage(self, epoch):
        """Index of the stage that trains `epoch` (1-based)."""
        return next(i for i, end in enumerate(self.ends) if epoch <= end)

    def name(self, epoch):
        return self.names[self.stage(epoch)]

    def forward(self, *args, **kwargs) -> LossOutput:
        """The current epoch's stage's Loss.forward."""
        return self.stages[self.stage(self.epoch)](*args, **kwargs)


def build_loss(config, item_counts, dim=None, matmul_dtype=None):
    """The loss module of a LossConfig; item_counts: (N + 1,) training interactions per item; dim: the item
    vectors' width (needed by --negative_queue); matmul_dtype: the softmax pools' (cli.amp_dtype)."""
    similarity = Similarity(config.similarity == "cosine", config.temperature, config.learn_temperature,
                            matmul_dtype)
    queue = NegativeQueue(config.negative_queue, dim) if config.negative_queue else None
    if not config.loss_schedule:
        return stage_loss(config.loss, config, similarity, item_counts, queue)
    return ScheduledLoss([(name, stage_loss(name, config, similarity, item_counts, queue), epochs)
                          for name, epochs in loss_stages(config.loss_schedule)])


def stage_loss(name, config, similarity, item_counts, queue=None):
    """The loss `name` with the LossConfig's settings, on `similarity`."""
    num_items = len(item_counts) - 1
    if name == "bce":
        return BCE(similarity)
    if name == "gbce":
        return GBCE(similarity, config.num_negatives, num_items, config.gbce_t)
    softmax = dict(hard_negatives=config.hard_negatives, gather_negatives=config.gather_negatives, queue=queue)
    if name == "infonce":
        return InfoNCE(similarity, symmetric=config.symmetric, **softmax)
    if name == "sampled_softmax" and config.negatives_per_position:
        return PerPositionSampledSoftmax(similarity, config.num_negatives)
    if name == "sampled_softmax":
        return SampledSoftmax(similarity, config.num_negatives, popularity(item_counts), config.in_batch_negatives,
                              config.logq_correction, **softmax)
    if name == "ce":
        return FullCE(similarity, config.hard_negatives)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def hard_negatives_at(config, step: int) -> int:
    """The K of --hard_negatives at the optimizer step `step` (0: the first): with --hard_negatives_to, linear
    from --hard_negatives to it over --hard_negatives_steps steps (rounded), then constant."""
    if config.hard_negatives_to is None:
        return config.hard_negatives
    done = min(1.0, step / config.hard_negatives_steps)
    return round(config.hard_negatives + (config.hard_negatives_to - config.hard_negatives) * done)


def popularity(item_counts, alpha=1.0):
    """(N + 1,) add-one smoothed share of the positives per item (padding 0): every log-probability finite;
    with `alpha`, proportional to (count + 1) ^ alpha (--popularity_alpha: the negative sampler's)."""
    log_counts = alpha * torch.log(torch.as_tensor(item_counts, dtype=torch.float64) + 1)
    counts = torch.exp(log_counts - log_counts[1:].max())  # scaled by the largest: finite for any alpha
    counts[0] = 0
    return (counts / counts.sum()).float()
