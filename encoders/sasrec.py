"""SASRec's block: softmax self-attention and a point-wise feed-forward, pre-norm or post-norm."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.bias import AttentionContext, RelativeBias
from encoders.dropout import Dropout


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through SDPA (fused kernels). Dropout is applied to the block's
    output rather than to attention weights: weight dropout forces SDPA onto its slow math path.
    A relative bias (--attn_bias) is added to the logits as SDPA's float mask (-inf where masked)."""

    def __init__(self, hidden_units, num_heads, bias: Optional[RelativeBias] = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_units, 3 * hidden_units)
        self.proj = nn.Linear(hidden_units, hidden_units)
        self.rel_bias = bias

    def forward(self, x, context: AttentionContext, last_only: bool = False):
        """(B, W, D) -> (B, W, D), or with last_only (B, 1, D): the last position's output alone (its query
        against every key; the keys and values still come from every position)."""
        B, W, D = x.shape
        shape = (B, -1, self.num_heads, D // self.num_heads)
        if last_only:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, -1:], w[:D], b[:D]).view(shape).transpose(1, 2)
            k, v = F.linear(x, w[D:], b[D:]).view(B, W, 2, *shape[2:]).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, W, 3, *shape[2:]).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu":  # under --amp bf16 too: CPU's bf16 attention backward took 6x fp32's
            q, k, v = q.float(), k.float(), v.float()
        mask = context.mask
        if self.rel_bias is not None:
            mask = self.rel_bias(context).masked_fill(~mask, float("-inf")).to(q.dtype)
        with torch.autocast(x.device.type, enabled=x.device.type != "cpu"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., -q.shape[2]:, :])
        return self.proj(y.transpose(1, 2).reshape(B, -1, D))


class Block(nn.Module):
    """Self-attention + point-wise feed-forward, pre-norm or post-norm."""

    def __init__(self, hidden_units, num_heads, dropout_rate, norm_first, bias: Optional[RelativeBias] = None):
        super().__init__()
        self.norm_first = norm_first
        self.attn_norm = nn.LayerNorm(hidden_units, eps=1e-8)
        self.attn = CausalSelfAttention(hidden_units, num_heads, bias)
        self.ffn_norm = nn.LayerNorm(hidden_units, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden_units, hidden_units), nn.ReLU(), Dropout(dropout_rate),
                                 nn.Linear(hidden_units, hidden_units))
        self.dropout = Dropout(dropout_rate)

    def forward(self, x, context: AttentionContext, last_only: bool = False):
        """(B, W, D) -> (B, W, D); last_only: (B, 1, D), the last position alone (evaluation's user vectors)."""
        residual = x[:, -1:] if last_only else x
        if self.norm_first:
            x = residual + self.dropout(self.attn(self.attn_norm(x), context, last_only))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(residual + self.dropout(self.attn(x, context, last_only)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))
