"""Negative items, drawn in one place for training and for sampled metrics.

`NegativeSampler` draws item ids 1..N uniformly or in proportion to popularity; host draws (numpy, with
the batch) can avoid every item of the user's training history; device draws (torch, inside the step)
cannot and need no host round trip. `BatchNegatives` is the sampler as one batch's loss sees it.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


class NegativeSampler:
    """probs: (N + 1,) sampling probability of each item (row 0 = padding = 0), or None for uniform.
    history: a dataset.LeaveOneOut whose training histories host draws avoid, or None."""

    def __init__(self, num_items, probs=None, history=None):
        self.num_items, self.history = num_items, history
        self.probs = None if probs is None else torch.as_tensor(probs, dtype=torch.float32)
        uniform = torch.full((num_items + 1,), 1 / num_items)
        uniform[0] = 0
        self.q = uniform if probs is None else self.probs  # each item's share of the draws, built once

    def expected_counts(self, draws, device):
        """(N + 1,) how often each item is expected among `draws` draws (for logQ corrections)."""
        if self.q.device != torch.device(device):
            self.q = self.q.to(device)
        return draws * self.q

    def draw(self, shape, device):
        """Item ids of `shape` with replacement, from torch's random stream (seeded per epoch: resumable)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self.probs is None:
            return torch.randint(1, self.num_items + 1, shape, device=device)
        probs = self.probs.to(device)
        return torch.multinomial(probs, math.prod(shape), replacement=True).view(shape)

    def draw_host(self, users, shape, rng, where=None, avoid=None, max_rounds=50):
        """(len(users), *shape) int64 ids from numpy `rng`; with a history, none is in its row's user's
        training items, nor equal to `avoid[row]` (e.g. the evaluation target). `where`: a mask of the
        entries wanted (the others are 0). Clashes alone are redrawn, and only redrawn ids are tested again."""
        ids = self._host_ids((len(users), *shape), rng)
        if self.history is None and avoid is None:
            return ids if where is None else np.where(where, ids, 0)
        clash = self._clashes(users, ids, avoid)
        if where is not None:
            clash &= where
        for _ in range(max_rounds):
            at = np.nonzero(clash)
            if not len(at[0]):
                break
            ids[at] = redrawn = self._host_ids(len(at[0]), rng)
            clash[at] = self._clashes(users[at[0]], redrawn, None if avoid is None else avoid[at[0]])
        return ids if where is None else np.where(where, ids, 0)

    def _host_ids(self, size, rng):
        if self.probs is None:
            return rng.integers(1, self.num_items + 1, size=size)
        p = self.probs.double().cpu().numpy()
        return rng.choice(len(p), size=size, p=p / p.sum())

    def _clashes(self, users, ids, avoid):
        clash = self.history.in_history(users, ids) if self.history is not None else np.zeros(ids.shape, bool)
        if avoid is not None:
            clash |= ids == np.asarray(avoid).reshape(avoid.shape + (1,) * (ids.ndim - avoid.ndim))
        return clash


@dataclass
class BatchNegatives:
    """What a loss may ask for one batch: the per-position negatives drawn with it (history-excluded),
    and fresh draws from the sampler. rows / shape place the R real positions in the (B, W) grid."""
    sampler: NegativeSampler
    rows: torch.Tensor                   # (R,) flat index of each real position in the (B x W) grid
    shape: tuple                         # (B, W)
    per_position: Optional[torch.Tensor] = None  # (R,) one negative per real position, or None

    def draw(self, shape, device):
        return self.sampler.draw(shape, device)

    @property
    def sequence_of_row(self):
        return self.rows // self.shape[1]
