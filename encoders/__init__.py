"""Sequence encoders: layers that map (B, L, D) token vectors to (B, L, D) states, each position seeing only
itself and earlier real positions.

    sasrec.Block     softmax self-attention + point-wise feed-forward (Kang & McAuley, 2018)
    hstu.HSTULayer   pointwise SiLU attention gated by U, no feed-forward (Zhai et al., ICML 2024)
    bias.RelativeBias  the relative position / time bias either can add to its attention logits

Every layer is called as layer(x, context, last_only) with context a bias.AttentionContext (the mask, and what
the relative bias reads); last_only (evaluation's user vectors): return the last position's output alone, (B, 1, D).
A new encoder is a module here with that call and one line in `build_layers`.
"""
import torch.nn as nn

from config import ModelConfig, attention_bias_kinds
from encoders.bias import RelativeBias
from encoders.hstu import HSTULayer
from encoders.sasrec import Block


def build_layers(config: ModelConfig, positions: int) -> nn.ModuleList:
    """--num_blocks layers of --encoder; positions: the longest sequence a layer sees (maxlen, + 1 with a user
    token), which sizes the position bias and is HSTU's attention divisor."""
    kinds = attention_bias_kinds(config.attn_bias)

    def bias():
        return RelativeBias(kinds, positions) if kinds else None
    if config.encoder == "hstu":
        return nn.ModuleList(HSTULayer(config.hidden_units, config.num_heads, config.dropout_rate, positions, bias())
                             for _ in range(config.num_blocks))
    return nn.ModuleList(Block(config.hidden_units, config.num_heads, config.dropout_rate, config.norm_first, bias())
                         for _ in range(config.num_blocks))
