"""A FIFO of earlier steps' negatives, added to a softmax loss's pool (--negative_queue N).

MoCo's queue (He et al. 2020) as cross-batch negative sampling (Wang et al. 2021): the pool no longer
grows only with the batch. Each step pushes its own fresh negatives, as the item table has just computed
them (detached), and drops the oldest, so the queue is refreshed as the table trains: an entry is at most
N / (negatives per step) steps old. Its ids travel with the vectors, so a queued copy of a row's positive
is masked like any accidental hit. Buffers, so checkpoints carry the queue and a resumed run goes on with it.
"""
import torch
import torch.nn as nn


class NegativeQueue(nn.Module):
    def __init__(self, size, dim):
        super().__init__()
        self.size = size
        self.register_buffer("ids", torch.zeros(size, dtype=torch.long))
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))  # entries ever pushed

    def __len__(self):
        return min(int(self.pushed), self.size)

    def contents(self):
        """(vectors (n, D), ids (n,)) of the n queued entries, oldest first."""
        n = len(self)
        order = (int(self.pushed) - n + torch.arange(n, device=self.ids.device)) % self.size
        return self.vectors[order], self.ids[order]

    def push(self, vectors, ids):
        """Enqueue (vectors (P, D), ids (P,)) in order; id 0 (padding of a gathered pool) is skipped."""
        keep = ids != 0
        vectors, ids = vectors.detach()[keep][-self.size:], ids[keep][-self.size:]
        slots = (self.pushed + torch.arange(len(ids), device=ids.device)) % self.size
        self.vectors[slots] = vectors.to(self.vectors.dtype)
        self.ids[slots] = ids
        self.pushed += len(ids)

    def extend(self, pool, pool_ids, pool_bias=None):
        """The pool with the queue's entries appended (queued before this step), then this step's pool queued.
        Returns (pool, pool_ids, pool_bias); bias 0 for queued entries when the pool has a bias."""
        n = len(self)  # the buffer as it lies, not contents(): order does not matter to a softmax
        extended = torch.cat([pool, self.vectors[:n].to(pool.dtype)]), torch.cat([pool_ids, self.ids[:n]])
        if pool_bias is not None:
            pool_bias = torch.cat([pool_bias, pool_bias.new_zeros(n)])
        if self.training:  # after the copies above: pushing overwrites the buffer in place
            self.push(pool, pool_ids)
        return (*extended, pool_bias)
