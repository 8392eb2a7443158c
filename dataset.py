"""The data types between the readers and the model: Interactions (a log as compact arrays), its
leave-one-out split, and the vectorised batches (readers/ fill Interactions; training and evaluation read it).

Everything is kept as two flat arrays: `items` (all interactions, grouped by user,
chronological) and `offsets` (user u owns items[offsets[u]:offsets[u+1]]). Item
indices run 1..N with 0 reserved for padding.
"""
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was expected."""


@dataclass
class Interactions:
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray    # (I,) int32 item indices in 1..N
    user_ids: np.ndarray  # (U,) raw user ids as strings
    item_ids: np.ndarray  # (N,) raw item ids as strings; item_ids[i - 1] is item i
    # Derived once and cached beside the rest (None: LeaveOneOut derives them):
    history: np.ndarray = None       # (I,) int32: items, each user's training part sorted (membership tests)
    split_counts: np.ndarray = None  # (2, N+1) int64: interactions per item before validation / test targets
    # Competition logs (readers/taac.py) also carry, per event and per entity:
    actions: np.ndarray = None  # (I,) int8 action type of each interaction (0 exposure, 1 click, 2 conversion)
    times: np.ndarray = None    # (I,) int64 unix seconds of each interaction
    item_side: object = None    # features.SideInfo of items 0..N (row 0 padding)
    user_side: object = None    # features.SideInfo of users 0..U-1
    # What the arrays were read from: a content hash of the file or folder (and its parse settings), or the
    # synthetic generator's settings. A checkpoint keeps it, so data changed under a run is noticed.
    fingerprint: str = None
    feature_codes: str = None   # competition folders: hash of indexer.pkl's feature-value map (what codes mean)

    @property
    def num_users(self):
        return len(self.offsets) - 1

    @property
    def num_items(self):
        return len(self.item_ids)

    @property
    def lengths(self):
        return np.diff(self.offsets)


# ----------------------------------------------------------------------------- split

def ragged_positions(starts, lengths):
    """(rows, flat_index) for the concatenated ranges [starts[r], starts[r] + lengths[r])."""
    lengths = np.asarray(lengths, np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return rows, np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(lengths.sum())


def left_padded(items: np.ndarray, ends: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) int64 matrix: row b is items[ends[b] - lengths[b]:ends[b]] right-aligned, 0 before it."""
    cols = np.arange(width)
    idx = ends[:, None] - width + cols[None, :]
    valid = cols[None, :] >= width - lengths[:, None]
    return np.where(valid, items[np.where(valid, idx, 0)], 0).astype(np.int64)


SPLITS = ("valid", "test")


def train_lengths(lengths):
    """Leave-one-out: a user with >= 3 items holds out the last two (validation, test); shorter ones hold out none."""
    return np.where(lengths >= 3, lengths - 2, lengths)


def sorted_history(data, chunk=1 << 22):
    """A copy of `items` with each user's training part sorted, for binary-search membership tests.
    Built a block of users at a time, so the temporaries stay small however long the log is."""
    history = np.array(data.items, dtype=np.int32)
    lengths = data.lengths
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(chunk, len(history), chunk))
    for users in np.split(np.arange(data.num_users), bounds):
        if not len(users):
            continue
        first = data.offsets[users[0]]
        rows, idx = ragged_positions(data.offsets[users] - first, train_lengths(lengths[users]))
        block = history[first:data.offsets[users[-1] + 1]]
        keys = np.sort(rows * (data.num_items + 1) + block[idx])  # rows stay in order, items sort inside each
        block[idx] = keys % (data.num_items + 1)
    return history


class LeaveOneOut:
    """Last item = test target, second-last = validation target, the rest trains.

    Users with fewer than 3 items train on everything and are not evaluated.
    """

    def __init__(self, data: Interactions, eval_actions: tuple | None = None):
        self.data, self.eval_actions = data, eval_actions
        lengths = data.lengths
        self.starts = data.offsets[:-1]
        self.eval_users = np.flatnonzero(lengths >= 3)
        self.num_short_users = int((lengths < 3).sum())
        self.train_lengths = train_lengths(lengths)
        self.history = data.history if data.history is not None else sorted_history(data)

    def eval_arrays(self, split: str, filtered: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For `split` in {'valid', 'test'}: users, history end (exclusive), history length, target item.
        filtered: only targets of --eval_actions (when the log has actions)."""
        users = self.eval_users
        hist_len = self.train_lengths[users] + (1 if split == "test" else 0)
        ends = self.starts[users] + hist_len
        if filtered and self.eval_actions is not None and self.data.actions is not None:  # chosen actions only
            keep = np.isin(self.data.actions[ends], self.eval_actions)
            users, hist_len, ends = users[keep], hist_len[keep], ends[keep]
        return users, ends, hist_len, self.data.items[ends].astype(np.int64)

    def item_counts(self, split: str) -> np.ndarray:
        """Interactions per item that precede `split`'s targets (training part, plus validation items for test)."""
        data = self.data
        if data.split_counts is not None:  # from the cache: no pass over the log
            return np.array(data.split_counts[SPLITS.index(split)])
        counts = np.bincount(data.items, minlength=data.num_items + 1)
        for held_out in ("test",) if split == "test" else ("test", "valid"):
            counts -= np.bincount(self.eval_arrays(held_out, filtered=False)[3], minlength=data.num_items + 1)
        counts[0] = 0
        return counts

    def in_history(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean mask: items[b, ...] is in the training history of users[b]. A vectorised binary search
        inside each user's sorted history: it reads only these users' pages of a memory-mapped log."""
        shape = users.shape + (1,) * (items.ndim - users.ndim)
        lo = np.broadcast_to(self.starts[users].reshape(shape), items.shape)
        lengths = self.train_lengths[users]
        end = lo + lengths.reshape(shape)
        hi, last = end, len(self.history) - 1
        for _ in range(int(lengths.max(initial=0)).bit_length()):
            mid = (lo + hi) >> 1
            active, right = lo < hi, self.history[np.minimum(mid, last)] < items
            lo, hi = np.where(active & right, mid + 1, lo), np.where(active & ~right, mid, hi)
        return (lo < end) & (self.history[np.minimum(lo, last)] == items)


# ----------------------------------------------------------------------------- training batches

@dataclass
class Batch:
    """One step's named tensors, (B, W) left-padded; only positions with positives != 0 count. The
    optional fields come with logs that have them (competition folders): what each input event was, and
    who the user is."""
    inputs: torch.Tensor     # (B, W) item ids of the history
    positives: torch.Tensor  # (B, W) the next item at each position (0: padding)
    users: torch.Tensor      # (B,) user indices
    rows: torch.Tensor       # (R,) flat index of each trained position in the (B x W) grid (found on the host)
    negatives: Optional[torch.Tensor] = None  # (B, W) one sampled negative per real position, if the loss asks
    actions: Optional[torch.Tensor] = None    # (B, W) action type + 1 of each input event (0: padding)
    next_actions: Optional[torch.Tensor] = None  # (B, W) action type + 1 of the event each position predicts
    times: Optional[torch.Tensor] = None      # (B, W, 4) time codes of each input event (see time_codes)
    event_times: Optional[torch.Tensor] = None  # (B, W) int64 seconds of each input event (0: padding)
    next_times: Optional[torch.Tensor] = None   # (B, W) its prediction time: the next event's, its own if unknown
    user_features: Optional[torch.Tensor] = None  # (B, F) the users' feature codes, features side by side
    weights: Optional[torch.Tensor] = None    # (R,) loss weight of each row (by its target's action), None: all 1

    def to(self, device: torch.device) -> "Batch":
        """A copy on `device`; on CUDA through page-locked memory, so the copies run asynchronously."""
        def move(t):
            if t is None or t.device == device:
                return t
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def num_users(self):
        return len(self.users)


TIME_BUCKETS = 33  # codes of a gap: 0 padding, 1 none (first event / no prediction time), 2..32 log2 buckets
UNKNOWN_PREDICTION_TIME = 0.1  # training positions whose gap to the prediction time is hidden ("none")


def gap_codes(seconds):
    return 2 + np.minimum(30, np.floor(np.log2(1.0 + np.maximum(seconds, 0)))).astype(np.int64)


def time_codes(times, idx, valid, starts, known_end):
    """(B, W, 4) codes of each input event: gap to the previous event of its user, gap to the next one (the
    prediction time of that position; known when idx + 1 < known_end), hour of day + 1, weekday + 1."""
    t = times[idx]
    has_prev = valid & (idx - 1 >= starts[:, None])
    has_next = valid & (idx + 1 < known_end[:, None])
    prev = np.where(has_prev, gap_codes(t - times[np.maximum(idx - 1, 0)]), 1)
    nxt = np.where(has_next, gap_codes(times[np.minimum(idx + 1, len(times) - 1)] - t), 1)
    hour, weekday = (t // 3600) % 24 + 1, (t // 86400 + 3) % 7 + 1  # 1970-01-01 was a Thursday (Monday = 1)
    return np.where(valid[..., None], np.stack([prev, nxt, hour, weekday], -1), 0)


def event_times(times, idx, valid, known_end):
    """((B, W) seconds of each input event, (B, W) its prediction time: the next event's where known (idx + 1 <
    known_end), else its own); 0 at padding."""
    t = np.where(valid, times[idx], 0).astype(np.int64)
    known = valid & (idx + 1 < known_end[:, None])
    return t, np.where(known, times[np.minimum(idx + 1, len(times) - 1)], t).astype(np.int64)


def user_feature_codes(data, users):
    """(B, F) the users' feature codes side by side, or None when the log has no user features."""
    side = data.user_side
    if side is None or not side.features:
        return None
    return torch.from_numpy(np.concatenate([np.asarray(f.values[users]) for f in side.features], 1).astype(np.int64))


def next_action_codes(actions, idx, valid, action_end, ask):
    """(B, W) action type + 1 of the event each position predicts (0 at padding): the log's where that event is
    an input of the batch (idx + 1 < action_end), else `ask` (--predict_action: the action the model is asked
    for; the held-out target's own action is never read)."""
    known = valid & (idx + 1 < action_end[:, None])
    logged = actions[np.minimum(idx + 1, len(actions) - 1)].astype(np.int64) + 1
    return np.where(known, logged, np.where(valid, ask + 1, 0))


def history_batch(data: Interactions, users: np.ndarray, ends: np.ndarray, lengths: np.ndarray, width: int,
                  known_end: np.ndarray | None = None, predict_action: int = 1) -> Batch:
    """The Batch of users whose histories are items[ends - lengths:ends] (no positives: evaluation and
    inference). known_end: events before it have known timestamps (default ends + 1: the target's time,
    the prediction time, is known); predict_action: the action the last position is asked to predict."""
    idx, valid = event_index(ends, lengths, width)
    inputs = np.where(valid, data.items[idx], 0).astype(np.int64)
    empty = torch.zeros(0, dtype=torch.long)
    batch = Batch(torch.from_numpy(inputs), torch.zeros_like(torch.from_numpy(inputs)), torch.from_numpy(users),
                  empty)
    add_context(batch, data, users, idx, valid, ends + 1 if known_end is None else known_end, ends, predict_action)
    return batch


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index arrays of at most `batch_size` users, in order of history length: a left-padded batch is as
    wide as its longest history, so batching similar lengths saves the padding's compute (Beauty's
    validation: 4.5x faster)."""
    order = np.argsort(lengths, kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def event_index(ends, lengths, width):
    """(B, W) flat index of each left-padded position (0 at padding) and the mask of real positions."""
    cols = np.arange(width)
    valid = cols[None, :] >= width - lengths[:, None]
    return np.where(valid, ends[:, None] - width + cols[None, :], 0), valid


def add_context(batch, data, users, idx, valid, known_end, action_end, predict_action=1):
    """Fill a batch's per-event and per-user fields from the log's arrays, where the log has them. Timestamps
    before known_end and actions before action_end are known; a position predicting a later event is asked for
    `predict_action`."""
    if data.actions is not None:
        batch.actions = torch.from_numpy(np.where(valid, data.actions[idx].astype(np.int64) + 1, 0))
        batch.next_actions = torch.from_numpy(next_action_codes(data.actions, idx, valid, action_end,
                                                                predict_action))
    if data.times is not None:
        starts = data.offsets[:-1][users]
        batch.times = torch.from_numpy(time_codes(data.times, idx, valid, starts, known_end))
        batch.event_times, batch.next_times = (torch.from_numpy(t) for t in event_times(data.times, idx, valid,
                                                                                          known_end))
    batch.user_features = user_feature_codes(data, users)


class TrainBatches:
    """Vectorised training batches: left-padded inputs and next-item positives (and, with a `sampler`,
    one negative per real position drawn outside the user's training history).

    Each batch is trimmed to its longest real sequence, and users are bucketed by length
    (sorted within windows of `bucket_batches` batches, then batch order shuffled), so the
    compute follows the number of real interactions, not users x maxlen.

    Under DDP (`world` ranks) each step takes `world` neighbouring batches of that sorted order, one per
    rank, so ranks get sequences of similar length and wait little for each other; the epoch's
    remainder of fewer than `world` batches is left out (a different one every epoch).
    """

    def __init__(self, split: "LeaveOneOut", maxlen, batch_size, bucket_batches=32, rank=0, world=1, sampler=None,
                 target_weights=None):
        self.split, self.maxlen, self.batch_size, self.bucket_batches = split, maxlen, batch_size, bucket_batches
        self.rank, self.world, self.sampler = rank, world, sampler
        # (max action + 1,) loss weight of a target by its action (0: not a target); None: every target 1
        self.target_weights = target_weights if split.data.actions is not None else None
        self.users = np.flatnonzero(split.train_lengths >= 2)  # need at least one (input, next) pair
        self.seq_lengths = np.minimum(split.train_lengths - 1, maxlen)
        # users none of whose trained positions has a target (e.g. exposures only) would make empty batches
        has_target = self.has_target(self.users)
        self.users_without_target = int((~has_target).sum())
        self.users = self.users[has_target]
        # trained positions per batch over an epoch: what --loss_reduction position divides a batch's sum by
        self.mean_rows = float(self.seq_lengths[self.users].sum()) / max(1, -(-len(self.users) // batch_size))

    def has_target(self, users):
        """Whether each user's trained positions (the last seq_lengths of its training part) hold a target of
        weight > 0; always true without target weights."""
        if self.target_weights is None:
            return np.ones(len(users), bool)
        is_target = np.concatenate([[0], np.cumsum(self.target_weights[self.split.data.actions] > 0)])
        ends = self.split.starts[users] + self.split.train_lengths[users]
        return is_target[ends] - is_target[ends - self.seq_lengths[users]] > 0

    def __len__(self):
        """Steps per epoch (batches per rank)."""
        return -(-len(self.users) // self.batch_size) // self.world

    def epoch(self, rng: np.random.Generator):
        """This rank's batches of one epoch; every rank draws the same users and order from `rng`."""
        users = rng.permutation(self.users)
        if self.bucket_batches > 1:
            window = self.batch_size * self.bucket_batches
            for s in range(0, len(users), window):
                chunk = users[s:s + window]
                users[s:s + window] = chunk[np.argsort(-self.seq_lengths[chunk], kind="stable")]
        batches = [users[s:s + self.batch_size] for s in range(0, len(users), self.batch_size)]
        order = rng.permutation(len(self))
        if self.world > 1:  # each rank its own negatives (the shared rng has given every rank the same order)
            rng = rng.spawn(self.world)[self.rank]
        for step in order:
            yield self.make_batch(batches[step * self.world + self.rank], rng)

    def make_batch(self, users: np.ndarray, rng: np.random.Generator) -> Batch:
        split, data = self.split, self.split.data
        lengths = self.seq_lengths[users]
        width = int(lengths.max())
        ends = split.starts[users] + split.train_lengths[users]
        idx, valid = event_index(ends - 1, lengths, width)
        seq = np.where(valid, data.items[idx], 0).astype(np.int64)
        pos = np.where(valid, data.items[idx + 1], 0).astype(np.int64)
        neg = None
        if self.sampler is not None:
            neg = torch.from_numpy(self.sampler.draw_host(users, (width,), rng, where=pos != 0))
        weights = None
        if self.target_weights is not None:  # by the target's action; weight 0 leaves the position out
            weights = np.where(valid, self.target_weights[data.actions[idx + 1]], 0)
            rows = np.flatnonzero(weights > 0)
            weights = torch.from_numpy(weights.ravel()[rows].astype(np.float32))
        else:
            rows = np.flatnonzero(pos != 0)
        batch = Batch(torch.from_numpy(seq), torch.from_numpy(pos), torch.from_numpy(users), torch.from_numpy(rows),
                      neg, weights=weights)
        add_context(batch, data, users, idx, valid, ends + 1, ends)
        if batch.times is not None:  # inference may not know the prediction time: "none" must be a code it learnt
            unknown = torch.from_numpy(rng.random(seq.shape) < UNKNOWN_PREDICTION_TIME) & (batch.inputs != 0)
            batch.times[..., 1].masked_fill_(unknown, 1)
            batch.next_times = torch.where(unknown, batch.event_times, batch.next_times)
        return batch
