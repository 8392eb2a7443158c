"""The attention mask and the relative attention bias (--attn_bias position,time), as HSTU's reference
computes its `rab` (meta-recsys/generative-recommenders, RelativeBucketedTimeAndPositionBasedBias):

    b(i, j) = w_position[i - j] + w_time[bucket(|t_next(i) - t_j|)]
    bucket(dt) = min(128, floor(ln(max(dt, 1)) / 0.301))

for query i and key j <= i, shared by the heads, one (w_position, w_time) per layer. t_next(i) is the time of
position i's target, the event it predicts (the prediction time), so the bias knows how far ahead it looks;
t_j is key j's own time. Where the prediction time is unknown (inference without it), t_next(i) = t_i.

Relation to --time_features: those embed log-bucketed gaps of each event (to the previous event and to the
prediction time) into its token, before any attention; this bias acts inside every layer's attention, on
every (query, key) pair's gap.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

TIME_BUCKETS = 129  # bucket(dt) in 0..128; 0.301 = log10(2) in natural-log units: ~1.35 buckets per doubling
BUCKET_WIDTH = 0.301


def time_buckets(query_times: torch.Tensor, key_times: torch.Tensor) -> torch.Tensor:
    """(B, L) query times (each position's prediction time), (B, L) key times (seconds) -> (B, L, L) buckets."""
    gap = (query_times[:, :, None] - key_times[:, None, :]).abs().clamp_min(1)
    # a float32 log, as the reference's (in float64, 2.6e-6 of the gaps up to 1e9 s, all within 740 s of an edge,
    # fell one bucket lower)
    return (gap.float().log() / BUCKET_WIDTH).long().clamp(max=TIME_BUCKETS - 1)


@dataclass
class AttentionContext:
    """What every layer's attention reads for one batch.
    mask (B, 1, L, L) bool: query i may attend key j (earlier or equal real positions; a padding query only
    itself). offsets (L, L): i - j, clamped at 0. buckets (B, L, L): time buckets, or None (no time bias)."""
    mask: torch.Tensor
    offsets: Optional[torch.Tensor] = None
    buckets: Optional[torch.Tensor] = None


def attention_context(real_keys: torch.Tensor, query_times=None, key_times=None, with_offsets=False):
    """The AttentionContext of a batch whose (B, L) real_keys marks real tokens; times (B, L) for a time bias."""
    B, L = real_keys.shape
    device = real_keys.device
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # Real queries see earlier real keys; each padding query sees only itself (no all-masked rows -> no NaN).
    mask = (causal & real_keys[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
    offsets = None
    if with_offsets:
        position = torch.arange(L, device=device)
        offsets = (position[:, None] - position[None, :]).clamp_min(0)
    buckets = time_buckets(query_times, key_times) if query_times is not None else None
    return AttentionContext(mask, offsets, buckets)


class RelativeBias(nn.Module):
    """b(i, j) of the module docstring for the kinds asked ('position', 'time'); positions: the longest
    sequence (offsets 0..positions - 1). Weights start at N(0, 0.02), as the reference's."""

    def __init__(self, kinds: tuple, positions: int):
        super().__init__()
        self.position = nn.Parameter(torch.empty(positions).normal_(0, 0.02)) if "position" in kinds else None
        self.time = nn.Parameter(torch.empty(TIME_BUCKETS).normal_(0, 0.02)) if "time" in kinds else None

    def forward(self, context: AttentionContext) -> torch.Tensor:
        """(B or 1, 1, L, L) bias for the logits of context's batch."""
        bias = None
        if self.position is not None:
            bias = self.position[context.offsets][None, None]
        if self.time is not None:
            if context.buckets is None:
                raise ValueError("a time attention bias needs the batch's event times (the log has none)")
            by_time = self.time[context.buckets][:, None]
            bias = by_time if bias is None else bias + by_time
        return bias
