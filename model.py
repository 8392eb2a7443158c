"""SASRec: a causal transformer over left-padded item sequences (Kang & McAuley, 2018)."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Dropout(nn.Module):
    """Inverted dropout. On CPU the mask is built in numpy from raw PCG64 output (seeded from torch's
    generator, so runs stay reproducible): one byte per element, compared and scaled in numpy, then one
    float multiply in torch. torch's CPU bernoulli took 1.6 ms for a (128, 20, 50) batch and its
    uint8/bool elementwise ops ~0.1 ms each; this takes ~0.1 ms in all (bench/train_speed.py)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type == "cpu":  # p in steps of 1/256; the scale uses the exact keep rate
            drop = round(256 * self.p)
            bits = np.random.PCG64(int(torch.randint(0, 2 ** 62, (1,)))).random_raw(-(-x.numel() // 8))
            byte = bits.view(np.uint8)[:x.numel()].reshape(x.shape)
            keep = np.multiply(byte >= drop, np.float32(256 / (256 - drop)), dtype=np.float32)
            return x * torch.from_numpy(keep).to(x.dtype)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * (keep * (1.0 / (1.0 - self.p)))


class RowGather(torch.autograd.Function):
    """table[ids] whose backward is zeros + index_add_ with the padding row (0) left at zero: what
    nn.Embedding(padding_idx=0) computes, in half the time on CPU (embedding_dense_backward sorts)."""

    @staticmethod
    def forward(ctx, table, ids):
        ctx.save_for_backward(ids)
        ctx.table_shape = table.shape
        return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        grad_table = grad.new_zeros(ctx.table_shape).index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        grad_table[0] = 0
        return grad_table, None


def gather_rows(table, ids):
    """Rows of an embedding table (row 0 = padding, never trained) for ids of any shape."""
    return RowGather.apply(table, ids)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through SDPA (fused kernels). Dropout is applied to the block's
    output rather than to attention weights: weight dropout forces SDPA onto its slow math path."""

    def __init__(self, hidden_units, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_units, 3 * hidden_units)
        self.proj = nn.Linear(hidden_units, hidden_units)

    def forward(self, x, attn_mask):
        B, W, D = x.shape
        q, k, v = self.qkv(x).view(B, W, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, W, D))


class Block(nn.Module):
    """Self-attention + point-wise feed-forward, pre-norm or post-norm."""

    def __init__(self, hidden_units, num_heads, dropout_rate, norm_first):
        super().__init__()
        self.norm_first = norm_first
        self.attn_norm = nn.LayerNorm(hidden_units, eps=1e-8)
        self.attn = CausalSelfAttention(hidden_units, num_heads)
        self.ffn_norm = nn.LayerNorm(hidden_units, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden_units, hidden_units), nn.ReLU(), Dropout(dropout_rate),
                                 nn.Linear(hidden_units, hidden_units))
        self.dropout = Dropout(dropout_rate)

    def forward(self, x, attn_mask):
        if self.norm_first:
            x = x + self.dropout(self.attn(self.attn_norm(x), attn_mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class ItemSide(nn.Module):
    """Item side information fused with the id embedding, as the competition basemodel builds items:
    concatenate [id embedding, one pooled embedding per attribute feature, each pretrained vector projected
    to hidden_units], then a dense layer to hidden_units. Multi-valued features are averaged over their
    values (padding slots masked); items without a pretrained vector get a learned default. The per-item
    value codes and vectors are buffers, so a checkpoint carries them and inference reads no feature file.
    `spec` is features.ItemSideInfo.spec(); `use_id=False` gives a pure-content item tower."""

    def __init__(self, num_items, hidden_units, spec, use_id=True):
        super().__init__()
        self.use_id = use_id
        self.feature_emb = nn.ModuleList(nn.Embedding(f["vocab_size"], hidden_units, padding_idx=0)
                                         for f in spec["features"])
        self.vector_proj = nn.ModuleList(nn.Linear(v["dim"], hidden_units) for v in spec["vectors"])
        # (requires_grad only when there are vectors: an empty parameter would be "unused" to DDP)
        self.vector_default = nn.Parameter(torch.zeros(len(spec["vectors"]), hidden_units),
                                           requires_grad=bool(spec["vectors"]))
        for i, f in enumerate(spec["features"]):
            self.register_buffer(f"feature_values{i}", torch.zeros(num_items + 1, f["width"], dtype=torch.long))
        for j, v in enumerate(spec["vectors"]):
            self.register_buffer(f"vectors{j}", torch.zeros(num_items + 1, v["dim"]))
            self.register_buffer(f"has_vector{j}", torch.zeros(num_items + 1, dtype=torch.bool))
        parts = int(use_id) + len(spec["features"]) + len(spec["vectors"])
        self.fuse = nn.Linear(parts * hidden_units, hidden_units)

    def load_arrays(self, info):
        """Copy a features.ItemSideInfo's arrays into the buffers."""
        with torch.no_grad():
            for i, f in enumerate(info.features):
                getattr(self, f"feature_values{i}").copy_(torch.from_numpy(f.values))
            for j, v in enumerate(info.vectors):
                getattr(self, f"vectors{j}").copy_(torch.from_numpy(v.vectors))
                getattr(self, f"has_vector{j}").copy_(torch.from_numpy(v.present))

    def forward(self, ids, id_table):
        parts = [gather_rows(id_table, ids)] if self.use_id else []
        for i, emb in enumerate(self.feature_emb):
            codes = getattr(self, f"feature_values{i}")[ids]  # (..., width); code 0 = an empty slot
            filled = (codes != 0).unsqueeze(-1)
            parts.append((gather_rows(emb.weight, codes) * filled).sum(-2) / filled.sum(-2).clamp_min(1))
        for j, proj in enumerate(self.vector_proj):
            projected = proj(getattr(self, f"vectors{j}")[ids])
            parts.append(torch.where(getattr(self, f"has_vector{j}")[ids].unsqueeze(-1), projected,
                                     self.vector_default[j]))
        return self.fuse(torch.cat(parts, -1)) * (ids != 0).unsqueeze(-1)


class SASRec(nn.Module):
    def __init__(self, num_items, maxlen=50, hidden_units=50, num_blocks=2, num_heads=1, dropout_rate=0.2,
                 norm_first=True, side_spec=None, use_item_id=True, separate_output=False):
        super().__init__()
        if hidden_units % num_heads:
            raise ValueError(f"--hidden_units ({hidden_units}) must be divisible by --num_heads ({num_heads})")
        has_side = bool(side_spec and (side_spec["features"] or side_spec["vectors"]))
        if not use_item_id and not has_side:
            raise ValueError("--no_item_id needs --item_features or --item_emb: items would have no representation")
        if separate_output and has_side:
            raise ValueError("--output_emb separate is for id embeddings only: with --item_features / --item_emb "
                             "the item tower scores the outputs")
        self.num_items, self.maxlen, self.hidden_units = num_items, maxlen, hidden_units
        self.item_emb = nn.Embedding(num_items + 1, hidden_units, padding_idx=0)
        self.item_side = ItemSide(num_items, hidden_units, side_spec, use_item_id) if has_side else None
        self.item_emb.weight.requires_grad_(use_item_id)  # a content-only tower never reads the id table
        # Output (scoring) table: the input table itself (tied, SASRec's default), or a table of its own.
        self.out_emb = nn.Embedding(num_items + 1, hidden_units, padding_idx=0) if separate_output else None
        self.pos_emb = nn.Embedding(maxlen, hidden_units)
        self.emb_dropout = Dropout(dropout_rate)
        self.blocks = nn.ModuleList(Block(hidden_units, num_heads, dropout_rate, norm_first)
                                    for _ in range(num_blocks))
        self.last_norm = nn.LayerNorm(hidden_units, eps=1e-8)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():  # xavier overwrote the padding rows
            for emb in [self.item_emb, self.out_emb, *(self.item_side.feature_emb if self.item_side else [])]:
                if emb is not None:
                    emb.weight[0].zero_()

    def item_vectors(self, ids):
        """Input item representations for ids of any shape: the id embedding, or the side-information tower."""
        if self.item_side is None:
            return gather_rows(self.item_emb.weight, ids)
        return self.item_side(ids, self.item_emb.weight)

    def sequence_states(self, seqs, inputs=None):
        """(B, W) left-padded item ids -> (B, W, D) states; padding positions are exactly zero.

        `inputs`: the ids' item vectors when the caller has them already (one lookup per step)."""
        B, W = seqs.shape
        if W > self.maxlen:
            raise ValueError(f"sequence width {W} exceeds maxlen {self.maxlen}")
        real = seqs != 0
        # Positions count from the right so the last item always gets the same embedding, whatever W is.
        # (a slice, not a lookup: its backward is a copy, not a dense scatter into the table)
        items = self.item_vectors(seqs) if inputs is None else inputs
        x = self.emb_dropout(items * math.sqrt(self.hidden_units) + self.pos_emb.weight[self.maxlen - W:])
        causal = torch.ones(W, W, dtype=torch.bool, device=seqs.device).tril()
        # Real queries see earlier real keys; each padding query sees only itself (no all-masked rows -> no NaN).
        # So padding never reaches a real position and is zeroed once, at the end, not in every block.
        attn_mask = (causal & real[:, None, None, :]) | torch.eye(W, dtype=torch.bool, device=seqs.device)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.last_norm(x) * real.unsqueeze(-1).to(x.dtype)

    forward = sequence_states

    def user_embeddings(self, seqs, normalize=False):
        """State at the last real position of each (left-padded) sequence: the user's query vector."""
        users = self.sequence_states(seqs)[:, -1]
        return F.normalize(users, dim=-1) if normalize else users

    def item_embeddings(self, item_ids=None, normalize=False):
        """Embeddings the states are scored against (the input table unless the output has its own); all
        items if ids is None."""
        if self.out_emb is not None:
            items = self.out_emb.weight if item_ids is None else gather_rows(self.out_emb.weight, item_ids)
        elif item_ids is None:
            items = self.item_emb.weight if self.item_side is None else self.item_vectors(
                torch.arange(self.num_items + 1, device=self.item_emb.weight.device))
        else:
            items = self.item_vectors(item_ids)
        return F.normalize(items, dim=-1) if normalize else items

    def score(self, seqs, item_ids=None, normalize=False):
        """Scores of each user against items: (B, N + 1), or (B, K) for (K,) ids.

        Dot products, or cosines with `normalize` (how an InfoNCE model was trained to rank).
        """
        return self.user_embeddings(seqs, normalize) @ self.item_embeddings(item_ids, normalize).T
