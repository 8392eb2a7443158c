"""HSTU, the Hierarchical Sequential Transduction Unit (Zhai et al., "Actions Speak Louder than Words",
ICML 2024), as its reference implementation computes it (meta-recsys/generative-recommenders,
research/modeling/sequential/hstu.py), on dense left-padded batches instead of jagged ones."""
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from encoders.bias import AttentionContext, RelativeBias
from encoders.dropout import Dropout

NORM_EPS = 1e-6  # the reference's layer norms: no learnt scale or shift


class HSTULayer(nn.Module):
    """One HSTU layer over X (B, L, D), H heads of width d = D / H:

        U, V, Q, K = split(SiLU(LayerNorm(X) W_uvqk))            W_uvqk: D x 4D, no bias
        A(i, j)    = SiLU(Q_i . K_j + rab(i, j)) / n * M(i, j)     per head; no 1 / sqrt(d), no softmax
        Y          = W_o Dropout(LayerNorm(A V) * U) + b_o + X     LayerNorm over all heads' D; no feed-forward

    n = `positions` (the longest sequence, the reference's padded length: a constant, so a state does not
    depend on the batch's width); M the causal mask over real keys (AttentionContext.mask); rab the
    relative bias (--attn_bias; none: 0). Init as the reference: W_uvqk ~ N(0, 0.02), W_o Xavier-uniform.
    """

    def __init__(self, hidden_units, num_heads, dropout_rate, positions, bias: Optional[RelativeBias] = None):
        super().__init__()
        self.num_heads, self.positions = num_heads, positions
        self.uvqk = nn.Linear(hidden_units, 4 * hidden_units, bias=False)
        self.out = nn.Linear(hidden_units, hidden_units)
        self.dropout = Dropout(dropout_rate)
        self.rel_bias = bias
        self.reset_parameters()

    def reset_parameters(self):
        """The reference's init (the model's Xavier-normal pass over every matrix runs first)."""
        nn.init.normal_(self.uvqk.weight, 0, 0.02)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x, context: AttentionContext, last_only: bool = False):
        """(B, L, D) -> (B, L, D); last_only: (B, 1, D), the last position alone (its U and Q; every V and K)."""
        B, L, D = x.shape
        heads = self.num_heads
        normed = F.layer_norm(x, (D,), eps=NORM_EPS)
        if last_only:  # W_uvqk's row blocks are U, V, Q, K: U and Q of the last position only
            last, blocks = normed[:, -1:], self.uvqk.weight.split(D)
            inputs = (last, normed, last, normed)
            u, v, q, k = (F.silu(F.linear(rows, w)) for rows, w in zip(inputs, blocks, strict=True))
        else:
            u, v, q, k = F.silu(self.uvqk(normed)).chunk(4, dim=-1)
        q, k, v = (t.reshape(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2)  # (B, H, L, L); last_only: (B, H, 1, L)
        if self.rel_bias is not None:
            logits = logits + self.rel_bias(context)[..., -q.shape[2]:, :]
        weights = F.silu(logits).masked_fill(~context.mask[..., -q.shape[2]:, :], 0) / self.positions
        attended = (weights @ v).transpose(1, 2).reshape(B, -1, D)
        residual = x[:, -1:] if last_only else x
        return residual + self.out(self.dropout(F.layer_norm(attended, (D,), eps=NORM_EPS) * u))
