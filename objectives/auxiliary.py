"""Auxiliary contrastive losses added to the training loss: --augment W and --align_side_info W.

augment (CL4SRec, Xie et al. 2022): two views of each training sequence, each made by one augmentation
drawn at random per sequence, and an InfoNCE that tells a sequence's two views apart from the batch's
other 2B - 2 views (states at the last position):
    crop     a random contiguous CROP_RATIO of the items, left-padded again
    mask     each item but the last hidden from attention with probability MASK_RATIO (its position stays;
             a hidden last item would leave the view without a state)
    reorder  a random contiguous REORDER_RATIO of the items shuffled
Views are built from the inputs alone (never the positives, so never a target), as index maps over the
(B, W) grid applied to every per-event field alike; padding stays padding.

align_side_info: an InfoNCE between each batch item's id embedding and its side-information vector (the
mean of its attribute embeddings and projected pretrained vectors); the batch's other items' vectors, of
either kind, are the negatives.

Both use cosine logits / AUXILIARY_TEMPERATURE. Random draws come from torch's stream, seeded per epoch.

extra_losses(loss_config) turns these and --l2_emb into the training step's optional terms, once, when the
step is built: the step adds whichever exist and reads no option of those that are off.
"""
import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

CROP_RATIO, MASK_RATIO, REORDER_RATIO = 0.6, 0.3, 0.6  # CL4SRec's eta, gamma, beta
AUXILIARY_TEMPERATURE = 0.1
ALIGN_ITEMS = 1024  # items aligned per step at most: the logits are (2 x items)^2
HIDDEN = -1  # a view position that shows nothing (padding)


def view_index(inputs, augmentations):
    """(B, W) left-padded ids -> (B, W) source position of each view position, HIDDEN where it shows none;
    each row uses one of `augmentations`, drawn at random."""
    B, W = inputs.shape
    device = inputs.device
    lengths = (inputs != 0).sum(1)
    position = torch.arange(W, device=device).expand(B, W)
    first = W - lengths  # left padding: real items at first .. W - 1
    maps = {"crop": crop, "mask": mask, "reorder": reorder}
    choice = torch.randint(len(augmentations), (B,), device=device)
    index = torch.where(position >= first[:, None], position, HIDDEN)
    for k, name in enumerate(augmentations):
        index = torch.where((choice == k)[:, None], maps[name](position, first, lengths), index)
    return index


def window(lengths, ratio):
    """Each row's window of floor(ratio x length) items (at least 1) at a random offset: (start, size), as
    offsets from the row's first real item."""
    size = (lengths.float() * ratio).floor().long().clamp_min(1).minimum(lengths)
    start = (torch.rand(len(lengths), device=lengths.device) * (lengths - size + 1)).floor().long()
    return start, size


def crop(position, first, lengths):
    start, size = window(lengths, CROP_RATIO)
    W = position.shape[1]
    source = first[:, None] + start[:, None] + position - (W - size)[:, None]  # the window, right-aligned
    return torch.where(position >= (W - size)[:, None], source, HIDDEN)


def mask(position, first, lengths):
    W = position.shape[1]
    hide = (torch.rand(position.shape, device=position.device) < MASK_RATIO) & (position < W - 1)
    return torch.where((position >= first[:, None]) & ~hide, position, HIDDEN)


def reorder(position, first, lengths):
    start, size = window(lengths, REORDER_RATIO)
    lo = (first + start)[:, None]
    inside = (position >= lo) & (position < lo + size[:, None])
    # sort keys: positions outside the window keep theirs; inside, random keys within [lo, lo + size - 1)
    keys = torch.where(inside, lo + torch.rand(position.shape, device=position.device) * (size[:, None] - 1),
                       position.float())
    shuffled = keys.argsort(1)
    return torch.where(position >= first[:, None], shuffled, HIDDEN)


def apply_view(batch, index):
    """The batch as seen through a view index: every per-event field gathered alike, HIDDEN -> padding."""
    shown = index != HIDDEN
    source = index.clamp_min(0)

    def gather(t):
        if t is None:
            return None
        picked = t.gather(1, source.view(*source.shape, *([1] * (t.dim() - 2))).expand_as(t))
        return picked * shown.view(*shown.shape, *([1] * (t.dim() - 2))).to(t.dtype)
    return dataclasses.replace(batch, inputs=gather(batch.inputs), actions=gather(batch.actions),
                               next_actions=gather(batch.next_actions), times=gather(batch.times),
                               event_times=gather(batch.event_times), next_times=gather(batch.next_times))


def paired_infonce(a, b):
    """InfoNCE of 2B vectors where a[i] and b[i] are each other's positive and every other one a negative."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = z @ z.T / AUXILIARY_TEMPERATURE
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
    return F.cross_entropy(logits, partner)


def augmentation_loss(model, batch, augmentations):
    """CL4SRec's auxiliary loss for one batch: two views per sequence, states at the last position."""
    views = [model.encode(apply_view(batch, view_index(batch.inputs, augmentations)))[:, -1] for _ in range(2)]
    return paired_infonce(*views)


def alignment_loss(tower, ids):
    """InfoNCE between the id embeddings and side-information vectors of the unique items among `ids` (a
    random ALIGN_ITEMS of them at most)."""
    items = torch.unique(ids[ids != 0])
    items = items[torch.randperm(len(items), device=items.device)[:ALIGN_ITEMS]]
    return paired_infonce(tower.id_emb(items), tower.side_vectors(items))


class ExtraLoss(NamedTuple):
    """An optional term of the training loss: the step adds weight x term(model, batch, pos_ids) and keeps the
    unweighted term in LossOutput.<field> (TensorBoard's train/<field>) when `field` names one."""
    field: Optional[str]
    weight: float
    term: Callable


def l2_term(model, batch, pos_ids):
    return sum(table.norm() for table in model.id_tables())


def augment_term(augmentations):
    return lambda model, batch, pos_ids: augmentation_loss(model, batch, augmentations)


def align_term(model, batch, pos_ids):
    return alignment_loss(model.item_tower, pos_ids)


def extra_losses(l2_emb=0.0, augment=0.0, augmentations=(), align_side_info=0.0):
    """The step's extra terms, in the order they are added: --l2_emb, --augment, --align_side_info; those at
    weight 0 are left out."""
    extras = (ExtraLoss(None, l2_emb, l2_term), ExtraLoss("augment_loss", augment, augment_term(tuple(augmentations))),
              ExtraLoss("align_loss", align_side_info, align_term))
    return tuple(extra for extra in extras if extra.weight)
