import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from losses import bce_loss, infonce_loss, training_loss


def test_bce_hand_computed():
    loss = bce_loss(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert abs(loss.item() - expected) < 1e-6


class FixedStates(nn.Module):
    """Stands in for SASRec: fixed states, and a 2-d item table of unit vectors."""

    def __init__(self, states):
        super().__init__()
        self.states = states
        self.item_emb = nn.Embedding.from_pretrained(torch.tensor(
            [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -1.0]]))  # items 1..4: +x, +y, -x, -y

    def sequence_states(self, seq):
        return self.states

    def item_embeddings(self, ids):
        return self.item_emb(ids)


def test_infonce_hand_computed_2x3_ignores_padding():
    # Batch of 2 sequences x 3 positions; (0, 0) is padding. Every real state points along +x,
    # so with T=1 each logit is the cosine: +1, 0 or -1. The padding row has a state and a negative
    # of its own (item 1) that would change the loss if they were used.
    states = torch.tensor([[[0.0, 5.0], [2.0, 0.0], [1.0, 0.0]],
                           [[3.0, 0.0], [1.0, 0.0], [0.5, 0.0]]])
    pos = torch.tensor([[0, 1, 2], [1, 3, 2]])
    neg = torch.tensor([[1, 2, 3], [4, 1, 2]])
    args = SimpleNamespace(use_infonce=True, infonce_temperature=1.0, l2_emb=0.0)
    loss, (pos_logits, neg_logits) = training_loss(FixedStates(states), None, pos, neg, args, with_logits=True)
    # Pool of negatives of real positions: items [2, 3, 4, 1, 2] -> cosines with +x: [0, -1, 0, 1, 0].
    # A pool entry equal to the row's positive is masked out.
    e = math.e
    row_pos1 = -1 + math.log(e + 0 + 3 + 1 / e)   # positive item 1 (cos 1); pool minus the item-1 entry
    row_pos2 = 0 + math.log(1 + 1 / e + 1 + e)     # positive item 2 (cos 0); pool minus both item-2 entries
    row_pos3 = 1 + math.log(1 / e + 3 + e)         # positive item 3 (cos -1); pool minus the item-3 entry
    expected = (2 * row_pos1 + 2 * row_pos2 + row_pos3) / 5
    assert abs(loss.item() - expected) < 1e-6
    assert pos_logits.tolist() == [1.0, 0.0, 1.0, -1.0, 0.0]
    assert sorted(neg_logits.tolist()) == [-1.0] * 4 + [0.0] * 11 + [1.0] * 3  # 25 pairs, 7 masked
    # temperature divides every logit
    args.infonce_temperature = 0.5
    loss_half, _ = training_loss(FixedStates(states), None, pos, neg, args)
    row_pos1 = -2 + math.log(e ** 2 + 3 + e ** -2)
    row_pos2 = math.log(2 + e ** -2 + e ** 2)
    row_pos3 = 2 + math.log(e ** -2 + 3 + e ** 2)
    assert abs(loss_half.item() - (2 * row_pos1 + 2 * row_pos2 + row_pos3) / 5) < 1e-5


def test_infonce_chunked_equals_unchunked_loss_and_gradients():
    torch.manual_seed(0)
    R, D = 37, 6
    pos_ids, neg_ids = torch.randint(1, 9, (R,)), torch.randint(1, 9, (R,))  # many accidental hits
    inputs = [torch.randn(R, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    results = []
    for chunk_elems in (R * R, 5 * R, 1):  # one chunk, 5-row chunks, 1-row chunks
        loss = infonce_loss(*inputs, pos_ids, neg_ids, 0.2, chunk_elems=chunk_elems)
        grads = torch.autograd.grad(loss, inputs)
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0)


def test_l2_emb_adds_item_table_norm():
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pos, neg = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    model = FixedStates(states)
    base = SimpleNamespace(use_infonce=False, infonce_temperature=1.0, l2_emb=0.0)
    l0, _ = training_loss(model, None, pos, neg, base)
    l1, _ = training_loss(model, None, pos, neg, SimpleNamespace(**{**vars(base), "l2_emb": 0.5}))
    assert abs((l1 - l0).item() - 0.5 * math.sqrt(1 + 4 + 9 + 1)) < 1e-6
