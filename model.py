"""SASRec: a causal transformer over left-padded item sequences (Kang & McAuley, 2018).

    model = SASRec(ModelConfig(num_items=N, ...))
    states = model.encode(batch)            # (B, W, D); padding positions exactly zero (training)
    tower = model.target_tower              # the item vectors the states are scored against:
    vectors = tower(ids)                    #   (..., D) for ids; tower() every item's, (N + 1, D)
    table = model.item_table()              # evaluation: every input item vector, once, without grad
    users = model.user_embeddings(batch, item_table=table)            # (B, D) query vectors
    items = model.item_embeddings(normalize=True, item_table=table)   # (N + 1, D) scored against
    scores = model.score(seqs)              # (B, N + 1) against the whole catalogue
"""
import contextlib
import dataclasses
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig, attention_bias_kinds, model_config_from_dict
from encoders import build_layers
from encoders.bias import attention_context
from encoders.dropout import Dropout


class ItemTower(nn.Module):
    """Every item vector comes from here: sequence inputs, loss targets, retrieval candidates.

    Without side information an item is its id embedding. With it, as the competition basemodel builds
    items: [id embedding, one pooled embedding per attribute feature, each pretrained vector projected to
    hidden_units] concatenated, then a dense layer. Multi-valued features are averaged over their values
    (padding slots masked); items without a pretrained vector get a learned default. The per-item codes
    and vectors are buffers, so a checkpoint carries them and inference reads no feature file; so are the
    --semantic_ids codebooks (`semantic_codebooks`, (L, K, d); the codes themselves are features).
    `side_spec` is features.SideInfo.spec(); `use_id=False` gives a pure-content tower."""
    TABLE_CHUNK = 65536  # items per block of a whole table built without grad (forward())

    def __init__(self, num_items, hidden_units, side_spec=None, use_id=True, id_dropout=0.0, id_row_dropout=0.0):
        super().__init__()
        features = (side_spec or {}).get("features", [])
        vectors = (side_spec or {}).get("vectors", [])
        if not use_id and not (features or vectors):
            raise ValueError("--no_item_id needs --item_features or --item_emb: items would have no representation")
        self.num_items = num_items
        self.id_emb = nn.Embedding(num_items + 1, hidden_units, padding_idx=0) if use_id else None
        self.feature_emb = nn.ModuleList(nn.Embedding(f["vocab_size"], hidden_units, padding_idx=0)
                                         for f in features)
        self.vector_proj = nn.ModuleList(nn.Linear(v["dim"], hidden_units) for v in vectors)
        self.vector_default = nn.Parameter(torch.zeros(len(vectors), hidden_units)) if vectors else None
        for i, f in enumerate(features):
            self.register_buffer(f"feature_values{i}", torch.zeros(num_items + 1, f["width"], dtype=torch.long))
        for j, v in enumerate(vectors):  # float16: a 500k x 1024 table is 1 GB, not 2
            self.register_buffer(f"vectors{j}", torch.zeros(num_items + 1, v["dim"], dtype=torch.float16))
            self.register_buffer(f"has_vector{j}", torch.zeros(num_items + 1, dtype=torch.bool))
        semantic = (side_spec or {}).get("semantic_ids")
        if semantic:  # --semantic_ids: the quantiser travels with the weights, so inference can code cold items
            self.register_buffer("semantic_codebooks", torch.zeros(semantic["levels"], semantic["k"], semantic["dim"]))
        parts = int(use_id) + len(features) + len(vectors)
        self.fuse = nn.Linear(parts * hidden_units, hidden_units) if features or vectors else None
        self.id_dropout = Dropout(id_dropout)
        self.id_row_dropout = id_row_dropout
        self._step_ids = None  # the id table under this step's dropout mask (dropout_step)

    @contextlib.contextmanager
    def dropout_step(self):
        """One training step with one dropout mask over the whole id table, so an item has the same vector
        wherever the step uses it (input, target, negative), as RecTools 0.13 drops its catalogue's
        embeddings (eSASRec's SASRec+SS row trained so). Costs an (N + 1) x D mask per step. --item_id_dropout:
        the step's table also loses whole rows, unscaled, so those items look as a creative unknown to training
        does at inference (extend(): no id embedding)."""
        if not (self.training and (self.id_dropout.p or self.id_row_dropout) and self.id_emb is not None):
            yield
            return
        table = self.id_dropout(self.id_emb.weight)
        if self.id_row_dropout:
            kept = torch.rand(len(table), device=table.device) >= self.id_row_dropout
            table = table * kept.unsqueeze(1).to(table.dtype)
        self._step_ids = table
        try:
            yield
        finally:
            self._step_ids = None

    def id_vectors(self, ids):
        if self._step_ids is None:
            return self.id_emb(ids)
        return F.embedding(ids, self._step_ids, padding_idx=0)

    def load_arrays(self, info):
        """Copy a features.SideInfo's arrays into the buffers."""
        with torch.no_grad():
            for i, f in enumerate(info.features):
                copy_rows(getattr(self, f"feature_values{i}"), f.values)
            for j, v in enumerate(info.vectors):
                copy_rows(getattr(self, f"vectors{j}"), v.vectors)
                copy_rows(getattr(self, f"has_vector{j}"), v.present)
            if getattr(info, "semantic", None) is not None:
                copy_rows(self.semantic_codebooks, info.semantic.codebooks)

    def forward(self, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Item vectors, the one way to get them: (...) item ids -> (..., D), id 0 (padding) giving zeros; no ids:
        every item's, (N + 1, D), row 0 the padding's (inside dropout_step, the step's dropped table). Without
        grad, the whole table is built in blocks of TABLE_CHUNK items: a 500k-item table with 1024-d vectors
        would otherwise hold several GB of temporaries at once."""
        if ids is None:
            if self.fuse is None:
                return self.id_emb.weight if self._step_ids is None else self._step_ids
            ids = torch.arange(self.num_items + 1, device=self.fuse.weight.device)
            if not torch.is_grad_enabled():
                step = self.TABLE_CHUNK
                return torch.cat([self(ids[s:s + step]) for s in range(0, len(ids), step)])
        if self.fuse is None:
            return self.id_vectors(ids)
        parts = ([self.id_vectors(ids)] if self.id_emb is not None else []) + self.side_parts(ids)
        return self.fuse(torch.cat(parts, -1)) * (ids != 0).unsqueeze(-1)

    def side_parts(self, ids):
        """(..., D) one vector per attribute feature (pooled codes) and per pretrained vector (projected)."""
        parts = [pooled(emb, getattr(self, f"feature_values{i}")[ids]) for i, emb in enumerate(self.feature_emb)]
        for j, proj in enumerate(self.vector_proj):
            projected = proj(getattr(self, f"vectors{j}")[ids].to(proj.weight.dtype))
            parts.append(torch.where(getattr(self, f"has_vector{j}")[ids].unsqueeze(-1), projected,
                                     self.vector_default[j]))
        return parts

    def side_vectors(self, ids):
        """(..., D) an item's side information alone: the mean of its side parts (--align_side_info)."""
        return torch.stack(self.side_parts(ids)).mean(0)

    @torch.no_grad()
    def extend(self, side):
        """Append K items unknown to training (inference over new candidates): no id embedding (zeros), their
        features and vectors from `side` (a features.SideInfo of K rows, in this tower's order; codes past
        a feature's vocabulary become 'unknown')."""
        count = len(side.features[0].values) if side.features else len(side.vectors[0].vectors)
        if self.id_emb is not None:
            w = self.id_emb.weight
            self.id_emb = nn.Embedding.from_pretrained(torch.cat([w, w.new_zeros(count, w.shape[1])]), padding_idx=0)
        for i, (emb, f) in enumerate(zip(self.feature_emb, side.features, strict=True)):
            codes = torch.from_numpy(np.asarray(f.values, np.int64))
            codes = torch.where(codes < emb.num_embeddings, codes, torch.ones_like(codes))
            name = f"feature_values{i}"
            width = getattr(self, name).shape[1]  # pad or trim to the training width
            codes = F.pad(codes, (0, max(0, width - codes.shape[1])))[:, :width]
            setattr(self, name, torch.cat([getattr(self, name), codes.to(getattr(self, name).device)]))
        for j, v in enumerate(side.vectors):
            for name, rows in ((f"vectors{j}", np.asarray(v.vectors, np.float16)),
                               (f"has_vector{j}", np.asarray(v.present))):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, torch.from_numpy(rows).to(old.device, old.dtype)]))
        self.num_items += count

    def id_tables(self):
        """The id embedding tables (what --l2_emb penalises)."""
        return [self.id_emb.weight] if self.id_emb is not None else []


def copy_rows(buffer, array, rows=65536):
    """buffer[:] = array, a block of rows at a time. Why: a cached array is a read-only memory map, which
    torch.from_numpy warns about; a block's copy is writable and small, a whole copy could be gigabytes."""
    for s in range(0, len(array), rows):
        buffer[s:s + rows].copy_(torch.from_numpy(np.array(array[s:s + rows])))


def pooled(emb, codes):
    """Mean of the embeddings of each row's codes (code 0 = an empty slot): (..., width) -> (..., D)."""
    filled = (codes != 0).unsqueeze(-1)
    return (emb(codes) * filled).sum(-2) / filled.sum(-2).clamp_min(1)


class UserTower(nn.Module):
    """A user's vector from their features (sparse and array, as the basemodel's user token): one pooled
    embedding per feature, concatenated, then a dense layer. `spec` is features.SideInfo.spec() of users."""

    def __init__(self, spec, hidden_units):
        super().__init__()
        self.widths = [f["width"] for f in spec["features"]]
        self.emb = nn.ModuleList(nn.Embedding(f["vocab_size"], hidden_units, padding_idx=0) for f in spec["features"])
        self.fuse = nn.Linear(len(self.widths) * hidden_units, hidden_units)

    def forward(self, codes):
        """(B, F) feature codes, features side by side -> (B, D)."""
        parts = [pooled(emb, c) for emb, c in zip(self.emb, codes.split(self.widths, dim=1), strict=True)]
        return self.fuse(torch.cat(parts, -1))


class EventContext(nn.Module):
    """What the log says of each input event besides its item: action type and time codes, embedded and
    summed into its token (dataset.time_codes: gap to previous, gap to prediction time, hour, weekday); with
    `next_actions` also the action type of the event the position predicts (never that event's item)."""
    TIME_VOCABS = (33, 33, 25, 8)

    def __init__(self, hidden_units, num_actions, time_features, next_actions=0):
        super().__init__()
        self.action_emb = nn.Embedding(num_actions + 1, hidden_units, padding_idx=0) if num_actions else None
        self.next_action_emb = nn.Embedding(next_actions + 1, hidden_units, padding_idx=0) if next_actions else None
        self.time_emb = nn.ModuleList(nn.Embedding(v, hidden_units, padding_idx=0) for v in self.TIME_VOCABS) \
            if time_features else None

    def forward(self, batch):
        """(B, W, D) to add to the item tokens, or None."""
        out = None
        if self.action_emb is not None and batch.actions is not None:
            out = self.action_emb(batch.actions)
        if self.next_action_emb is not None:
            if batch.next_actions is None:
                raise ValueError("--next_action needs each position's next action, and this batch has none")
            nxt = self.next_action_emb(batch.next_actions)
            out = nxt if out is None else out + nxt
        if self.time_emb is not None and batch.times is not None:
            for k, emb in enumerate(self.time_emb):
                out = emb(batch.times[..., k]) if out is None else out + emb(batch.times[..., k])
        return out


class SASRec(nn.Module):
    """The contract: encode(batch) -> states; target_tower scores them; item_table, user_embeddings,
    item_embeddings and score for evaluation and retrieval; from_checkpoint rebuilds a trained model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if c.hidden_units % c.num_heads:
            raise ValueError(f"--hidden_units ({c.hidden_units}) must be divisible by --num_heads ({c.num_heads})")
        has_side = bool(c.item_side and (c.item_side["features"] or c.item_side["vectors"]))
        if c.output_emb == "separate" and has_side:
            raise ValueError("--output_emb separate is for id embeddings only: with --item_features / --item_emb "
                             "the item tower scores the outputs")
        self.item_tower = ItemTower(c.num_items, c.hidden_units, c.item_side, not c.no_item_id, c.item_emb_dropout,
                                    c.item_id_dropout)
        # Scoring table: the input tower itself (tied, SASRec's default), or an id table of its own.
        self.output_tower = ItemTower(c.num_items, c.hidden_units) if c.output_emb == "separate" else None
        self.pos_emb = nn.Embedding(c.maxlen, c.hidden_units)
        has_users = bool(c.user_side and c.user_side["features"]) and c.user_features != "none"
        self.user_tower = UserTower(c.user_side, c.hidden_units) if has_users else None
        actions, next_actions = (c.num_actions if c.action_emb else 0), (c.num_actions if c.next_action else 0)
        self.context = EventContext(c.hidden_units, actions, c.time_features, next_actions) \
            if actions or next_actions or c.time_features else None
        self.emb_dropout = Dropout(c.dropout_rate)
        self.blocks = build_layers(c, c.maxlen + 1)  # + 1: room for a user token
        bias_kinds = attention_bias_kinds(c.attn_bias)
        self.position_bias, self.time_bias = "position" in bias_kinds, "time" in bias_kinds
        self.last_norm = nn.LayerNorm(c.hidden_units, eps=1e-8)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():  # xavier overwrote the padding rows
            for module in self.modules():
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
        for block in self.blocks:  # an encoder's own init (HSTU's), over the Xavier pass above
            if hasattr(block, "reset_parameters"):
                block.reset_parameters()

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """(N + 1, D) every input item vector, without grad: what an evaluation asks for once and passes to
        encode / user_embeddings / item_embeddings (item_table=), so that a batch of users reads rows instead
        of running the tower at every position (with features and multimodal vectors, that tower pass cost
        most of embedding a user). It holds the weights and catalogue of its call: ask again after a change."""
        return self.item_tower().detach()  # a tensor, never a registered Parameter

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "SASRec":
        """The model a checkpoint (checkpoint.load's dict) describes, with its weights, in eval mode.
        Raises ValueError / RuntimeError when the weights do not fit the saved config."""
        model = cls(dataclasses.replace(model_config_from_dict(checkpoint["model_config"]), dropout_rate=0.0))
        model.load_state_dict(checkpoint["model"])
        return model.eval()

    @property
    def target_tower(self):
        """The tower the states are scored against (losses, evaluation, retrieval)."""
        return self.output_tower if self.output_tower is not None else self.item_tower

    def id_tables(self):
        return self.item_tower.id_tables() + (self.output_tower.id_tables() if self.output_tower else [])

    def encode(self, batch, item_table: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """A dataset.Batch -> (B, W, D) states of its (B, W) inputs (with the user's and each event's context
        when the model has them and the batch carries them); padding positions are exactly zero.
        item_table: item_table()'s, whose rows replace the item tower's pass (evaluation); last_only: (B, 1, D),
        the last position's state alone (the last layer computes no other)."""
        extra = self.context(batch) if self.context is not None else None
        user = None
        if self.user_tower is not None and batch.user_features is not None:
            user = self.user_tower(batch.user_features)
        times = None
        if self.time_bias:
            if batch.event_times is None:
                raise ValueError("--attn_bias time needs event times, and this batch has none")
            times = (batch.next_times, batch.event_times)
        return self.sequence_states(batch.inputs, extra, user, item_table, times, last_only)

    def sequence_states(self, seqs, token_extra=None, user=None, item_table=None, times=None, last_only=False):
        """(B, W) left-padded item ids -> (B, W, D) states; padding positions are exactly zero.
        token_extra (B, W, D): added to the item tokens; user (B, D): the user's vector, as a first token
        every real position attends to (user_features 'token') or added to every state ('add');
        item_table (N + 1, D): item_table()'s, read instead of the item tower; times: ((B, W) prediction time of
        each position, (B, W) its event's time) in seconds, for the time attention bias; last_only: (B, 1, D), the
        last position's state alone (its layers' other outputs are nothing it reads)."""
        B, W = seqs.shape
        maxlen, hidden = self.config.maxlen, self.config.hidden_units
        if W > maxlen:
            raise ValueError(f"sequence width {W} exceeds maxlen {maxlen}")
        real = seqs != 0
        # Positions count from the right so the last item always gets the same embedding, whatever W is.
        # (a slice, not a lookup: its backward is a copy, not a dense scatter into the table)
        scale = math.sqrt(hidden) if self.config.emb_scale else 1.0
        items = self.item_tower(seqs) if item_table is None else F.embedding(seqs, item_table)
        x = items * scale + self.pos_emb.weight[maxlen - W:]
        if token_extra is not None:
            x = x + token_extra
        prefix = user is not None and self.config.user_features == "token"
        if prefix:  # the user token sits left of every item, so causality lets every position see it
            x, real_keys = torch.cat([user[:, None] * scale, x], 1), F.pad(real, (1, 0), value=True)
        else:
            real_keys = real
        x = self.emb_dropout(x)
        if times is not None and prefix:  # the user token's time: 0, a constant (the longest gaps' bucket)
            times = tuple(F.pad(t, (1, 0)) for t in times)
        # padding never reaches a real position (the mask), so it is zeroed once, at the end, not in every block
        context = attention_context(real_keys, *(times or ()), with_offsets=self.position_bias)
        for i, block in enumerate(self.blocks):
            x = block(x, context, last_only and i == len(self.blocks) - 1)
        if last_only:
            x, real = x[:, -1:], real[:, -1:]
        states = self.last_norm(x[:, 1:] if prefix and not last_only else x)
        if user is not None and not prefix:
            states = states + user[:, None]
        return states * real.unsqueeze(-1).to(x.dtype)

    forward = sequence_states

    def user_embeddings(self, batch, normalize: bool = False,
                        item_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) the state at the last real position of each (left-padded) history: the user's query vector,
        unit-length with `normalize`. batch: a dataset.Batch, or (B, W) item ids alone; item_table: as encode's."""
        if hasattr(batch, "inputs"):
            states = self.encode(batch, item_table, last_only=True)
        else:
            states = self.sequence_states(batch, item_table=item_table, last_only=True)
        users = states[:, -1]
        return F.normalize(users, dim=-1) if normalize else users

    def item_embeddings(self, item_ids: Optional[torch.Tensor] = None, normalize: bool = False,
                        item_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The vectors the states are scored against (target_tower's), unit-length with `normalize`: (K, D) for
        (K,) `item_ids`, or all (N + 1, D) rows (row 0 padding) if None. item_table: item_table()'s, whose rows
        are read when the inputs' tower is also the scoring one (tied): one tower pass per evaluation, not two."""
        tower = self.target_tower
        if item_table is not None and tower is self.item_tower:
            items = item_table if item_ids is None else item_table[item_ids]
        else:
            items = tower(item_ids)
        return F.normalize(items, dim=-1) if normalize else items

    def score(self, batch, item_ids: Optional[torch.Tensor] = None, normalize: bool = False) -> torch.Tensor:
        """Scores of each user (a Batch, or (B, W) item ids) against items: (B, N + 1), or (B, K) for (K,) ids.
        Dot products, or cosines with `normalize` (how a cosine-trained model ranks)."""
        return self.user_embeddings(batch, normalize) @ self.item_embeddings(item_ids, normalize).T
