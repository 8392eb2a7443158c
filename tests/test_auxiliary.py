import math

import pytest
import torch

from dataset import Batch
from model import ItemTower
from objectives import auxiliary


def left_padded(lengths, width, start=1):
    """Rows of distinct ids (start, start + 1, ...) left-padded to `width`."""
    rows, next_id = [], start
    for n in lengths:
        rows.append([0] * (width - n) + list(range(next_id, next_id + n)))
        next_id += n
    return torch.tensor(rows)


@pytest.mark.parametrize("name", ["crop", "mask", "reorder"])
def test_augmentations_keep_padding_and_never_leak_the_target(name):
    torch.manual_seed(0)
    lengths = [1, 2, 5, 9, 12, 12]
    inputs = left_padded(lengths, 12)
    positives = torch.cat([inputs[:, 1:], torch.full((len(lengths), 1), 1000)], 1) * (inputs != 0)  # 1000+: targets
    positives[:, -1] = 1000 + torch.arange(len(lengths))
    actions = (inputs % 3 + 1) * (inputs != 0)
    batch = Batch(inputs, positives, torch.arange(len(lengths)), torch.nonzero(positives.view(-1)).view(-1),
                  actions=actions)
    for _ in range(20):
        view = auxiliary.apply_view(batch, auxiliary.view_index(inputs, (name,)))
        for r, n in enumerate(lengths):
            shown = view.inputs[r]
            real = shown[shown != 0]
            assert (shown[:12 - n] == 0).all()  # the original padding stays padding
            assert set(real.tolist()) <= set(inputs[r].tolist()) - {0}  # only the row's own history
            assert not set(real.tolist()) & set(positives[r, -1:].tolist())  # never the target
            assert shown[-1] != 0  # the last position, whose state is the view's, shows an item
            assert ((view.actions[r] == 0) == (shown == 0)).all() and \
                (view.actions[r][shown != 0] == real % 3 + 1).all()  # other fields follow their events
            if name == "crop":  # a contiguous run of floor(0.6 n) items, right-aligned
                size = max(1, math.floor(0.6 * n))
                assert len(real) == size and (real.diff() == 1).all() and (shown[:12 - size] == 0).all()
            if name == "reorder":  # the same items, only a window moved
                assert sorted(real.tolist()) == inputs[r, 12 - n:].tolist()
                moved = (real != inputs[r, 12 - n:]).nonzero().view(-1)
                assert len(moved) == 0 or moved.max() - moved.min() < max(1, math.floor(0.6 * n))
            if name == "mask":  # items hidden in place, the last one never
                assert shown[-1] == inputs[r, -1] and ((shown == inputs[r]) | (shown == 0)).all()


def test_paired_infonce_hand_computed():
    a, b = torch.tensor([[1.0, 0]]), torch.tensor([[0.0, 1]])  # one pair, orthogonal: logits 0 / T
    assert auxiliary.paired_infonce(a, b).item() == pytest.approx(0.0, abs=1e-6)  # each view's only candidate
    a, b = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[1.0, 0], [0, 1]])
    t = auxiliary.AUXILIARY_TEMPERATURE  # view a1: partner b1 (cos 1), a2 and b2 (cos 0)
    assert auxiliary.paired_infonce(a, b).item() == pytest.approx(-1 / t + math.log(math.exp(1 / t) + 2), abs=1e-6)


def test_alignment_pulls_id_embeddings_towards_side_information():
    """A few steps of the alignment loss alone raise each item's cosine between its id embedding and its
    side vector above every other item's."""
    torch.manual_seed(0)
    spec = {"features": [{"name": "f", "vocab_size": 9, "width": 1}], "vectors": []}
    tower = ItemTower(8, 16, spec)
    tower.feature_values0.copy_(torch.arange(9)[:, None])  # item i has attribute value i
    ids = torch.arange(1, 9)
    optimizer = torch.optim.Adam(tower.parameters(), lr=0.05)
    before = auxiliary.alignment_loss(tower, ids).item()
    for _ in range(60):
        optimizer.zero_grad()
        auxiliary.alignment_loss(tower, ids).backward()
        optimizer.step()
    assert auxiliary.alignment_loss(tower, ids).item() < before / 4
    cos = torch.nn.functional.normalize(tower.id_emb(ids), dim=-1) @ \
        torch.nn.functional.normalize(tower.side_vectors(ids), dim=-1).T
    assert (cos.argmax(1) == torch.arange(8)).all()
