import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import exits
from config import LOSSES, build_config
from dataset import Batch
from objectives import losses
from objectives.losses import (
    bce_loss,
    build_loss,
    gbce_beta,
    hard_negatives_at,
    popularity,
    scaled_unit_rows,
    softmax_loss,
)
from objectives.samplers import NegativeSampler
from training.loop import TrainStep

E = math.e


def objective(*flags, counts=(0, 1, 1, 1, 1)):
    """The loss over 4 items, configured exactly as main.py would from these flags."""
    return build_loss(build_config(list(flags)).loss, np.array(counts))


class Table(nn.Module):
    """Stands in for the item tower: a fixed 2-d table (items 1..4: +x, +2y, -3x, -y)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0],
                                                              [0.0, -1.0]]))

    def forward(self, ids=None):
        return self.emb.weight if ids is None else self.emb(ids)

    def id_tables(self):
        return [self.emb.weight]

    def dropout_step(self):
        return contextlib.nullcontext()


class FixedStates(nn.Module):
    """Stands in for SASRec: encode() gives fixed (B, W, 2) states; the table above scores them."""

    def __init__(self, states):
        super().__init__()
        self.states, self.target_tower = states, Table()

    def encode(self, batch):
        return self.states

    def id_tables(self):
        return self.target_tower.id_tables()


def batch_of(pos, neg=None):
    rows = (pos != 0).view(-1).nonzero().squeeze(1)
    return Batch(pos, pos, torch.arange(len(pos)), rows, neg)


def call(loss, states, pos, neg=None, draws=None, with_logits=False, sampler=None):
    """`loss` on a (B, W, 2) grid of states, as the training step calls it: the real positions (pos != 0),
    their per-position negatives `neg`, and `draws` returned by the sampler (recorded in call.shapes)."""
    sampler = sampler or NegativeSampler(4)
    if draws is not None:
        call.shapes = []
        sampler.draw = lambda shape, device: call.shapes.append(shape) or draws
    out = TrainStep(FixedStates(states), loss, sampler)(batch_of(pos, neg), with_logits)
    return out if with_logits else out.loss


def one_row(pos_item, state=(1.0, 0.0)):
    """A batch of one sequence with one real position (a padding position before it)."""
    return torch.tensor([[[9.0, 9.0], list(state)]]), torch.tensor([[0, pos_item]])


def test_bce_hand_computed():
    loss = bce_loss(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_infonce_hand_computed_2x3_ignores_padding():
    # Batch of 2 sequences x 3 positions; (0, 0) is padding. Every real state points along +x,
    # so with T=1 each logit is the cosine: +1, 0 or -1. The padding row has a state and a negative
    # of its own (item 1) that would change the loss if they were used.
    states = torch.tensor([[[0.0, 5.0], [2.0, 0.0], [1.0, 0.0]],
                           [[3.0, 0.0], [1.0, 0.0], [0.5, 0.0]]])
    pos = torch.tensor([[0, 1, 2], [1, 3, 2]])
    neg = torch.tensor([[1, 2, 3], [4, 1, 2]])
    out = call(objective("--use_infonce", "--temperature", "1"), states, pos, neg, with_logits=True)
    loss, pos_logits, neg_logits = out.loss, out.pos_logits, out.neg_logits
    # Pool of negatives of real positions: items [2, 3, 4, 1, 2] -> cosines with +x: [0, -1, 0, 1, 0].
    # A pool entry equal to the row's positive is masked out.
    row_pos1 = -1 + math.log(E + 0 + 3 + 1 / E)   # positive item 1 (cos 1); pool minus the item-1 entry
    row_pos2 = 0 + math.log(1 + 1 / E + 1 + E)     # positive item 2 (cos 0); pool minus both item-2 entries
    row_pos3 = 1 + math.log(1 / E + 3 + E)         # positive item 3 (cos -1); pool minus the item-3 entry
    expected = (2 * row_pos1 + 2 * row_pos2 + row_pos3) / 5
    assert abs(loss.item() - expected) < 1e-6
    assert pos_logits.tolist() == [1.0, 0.0, 1.0, -1.0, 0.0]
    assert sorted(neg_logits.tolist()) == [-1.0] * 4 + [0.0] * 11 + [1.0] * 3  # 25 pairs, 7 masked
    # temperature divides every logit
    loss_half = call(objective("--loss", "infonce", "--temperature", "0.5"), states, pos, neg)
    row_pos1 = -2 + math.log(E ** 2 + 3 + E ** -2)
    row_pos2 = math.log(2 + E ** -2 + E ** 2)
    row_pos3 = 2 + math.log(E ** -2 + 3 + E ** 2)
    assert abs(loss_half.item() - (2 * row_pos1 + 2 * row_pos2 + row_pos3) / 5) < 1e-5


def test_scaled_unit_rows_matches_normalize_values_and_gradients():
    """The hand-written backward against autograd through F.normalize(x) / T, for x and a learnt T,
    with a zero row (F.normalize's eps path) and a fixed float scale."""
    torch.manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64)
    x[3] = 0
    g = torch.randn(6, 5, dtype=torch.float64)
    results = []
    for fn in (lambda x, t: scaled_unit_rows(x, 1 / t), lambda x, t: F.normalize(x, dim=-1) / t):
        xs, t = x.clone().requires_grad_(), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        y = fn(xs, t)
        results.append((y, *torch.autograd.grad((y * g).sum(), (xs, t))))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: scaled_unit_rows(x, 2.5), x[:3].clone().requires_grad_())
    torch.testing.assert_close(scaled_unit_rows(x, 2.5).norm(dim=-1), torch.tensor([2.5, 2.5, 2.5, 0, 2.5, 2.5],
                                                                                   dtype=torch.float64))


def test_softmax_chunked_equals_unchunked_loss_and_gradients(monkeypatch):
    from types import SimpleNamespace

    from objectives.losses import InfoNCE, Similarity
    torch.manual_seed(0)
    R, D = 37, 6
    pos_ids, neg_ids = torch.randint(1, 9, (R,)), torch.randint(1, 9, (R,))  # many accidental hits
    inputs = [torch.randn(R, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    states, pos_emb, neg_emb = inputs

    def rows(ids):  # InfoNCE asks once for cat([pos_ids, negatives]): each row's own raw vectors
        assert torch.equal(ids, torch.cat([pos_ids, neg_ids]))
        return torch.cat([pos_emb, neg_emb])
    negatives = SimpleNamespace(per_position=neg_ids)
    results = []
    for chunk_elems in (R * R, 5 * R, 1):  # one chunk, 5-row chunks, 1-row chunks
        monkeypatch.setattr(losses, "SOFTMAX_CHUNK_ELEMS", chunk_elems)
        loss = InfoNCE(Similarity(True, 0.2))(states, pos_ids, rows, negatives).loss  # cosine / T
        grads = torch.autograd.grad(loss, inputs)
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, g0)


def test_chunked_softmax_matches_plain_autograd_reference():
    """The fused chunked cross-entropy (gradients computed in its forward) against F.cross_entropy on the
    whole masked logits matrix, pool bias and accidental hits included."""
    torch.manual_seed(1)
    R, P, D = 23, 17, 5
    pos_ids, pool_ids = torch.randint(1, 6, (R,)), torch.randint(1, 6, (P,))
    q, pool, pos = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((R, D), (P, D), (R,)))
    bias = torch.randn(P, dtype=torch.float64)
    logits = (q @ pool.T + bias).masked_fill(pool_ids[None, :] == pos_ids[:, None], float("-inf"))
    reference = F.cross_entropy(torch.cat([pos[:, None], logits], 1), torch.zeros(R, dtype=torch.long))
    expected = torch.autograd.grad(reference, (q, pool, pos))
    for chunk_elems in (R * P, 4 * P, 1):
        loss = softmax_loss(q, pos, pool, pool_ids, pos_ids, bias, chunk_elems=chunk_elems)
        torch.testing.assert_close(loss, reference)
        for g, g0 in zip(torch.autograd.grad(loss * 3, (q, pool, pos)), expected, strict=True):
            torch.testing.assert_close(g, 3 * g0)  # backward scales by the incoming gradient


def test_full_ce_hand_computed():
    # dot-product logits of state +x against items 1..4: [1, 0, -3, 0]; the whole catalogue competes
    states, pos = one_row(1)
    out = call(objective("--loss", "ce"), states, pos, with_logits=True)
    assert abs(out.loss.item() - (-1 + math.log(E + 1 + E ** -3 + 1))) < 1e-6
    assert out.pos_logits.tolist() == [1.0] and sorted(out.neg_logits.tolist()) == [-3.0, 0.0, 0.0]
    # cosine / T: logits [1, 0, -1, 0] / 0.5
    loss = call(objective("--loss", "ce", "--similarity", "cosine", "--temperature", "0.5"), states, pos)
    assert abs(loss.item() - (-2 + math.log(E ** 2 + 2 + E ** -2))) < 1e-6


def test_sampled_softmax_logq_and_accidental_hits():
    # training counts of items 1..4: 3, 1, 0, 0 -> add-one smoothed popularity q = [.5, .25, .125, .125]
    counts = (0, 3, 1, 0, 0)
    obj = objective("--loss", "sampled_softmax", "--num_negatives", "3", "--neg_sampler", "popularity", counts=counts)
    sampler = NegativeSampler(4, popularity(counts))
    torch.testing.assert_close(obj.log_expected_count(sampler, 1)[1:],
                               torch.log(3 * torch.tensor([.5, .25, .125, .125])))
    states, pos = one_row(1)
    loss = call(obj, states, pos, draws=torch.tensor([2, 3, 1]), sampler=sampler)  # item 1 is the positive: masked
    assert call.shapes == [3]
    # every logit is shifted by -log(3 q): positive 1 - log 1.5; negatives 0 - log .75, -3 - log .375
    p, n2, n3 = 1 - math.log(1.5), -math.log(0.75), -3 - math.log(0.375)
    assert abs(loss.item() - (-p + math.log(E ** p + E ** n2 + E ** n3))) < 1e-6
    # without logQ the raw logits compete
    obj.logq = False
    assert abs(call(obj, states, pos, draws=torch.tensor([2, 3, 1])).item() - (-1 + math.log(E + 1 + E ** -3))) < 1e-6
    # uniform sampling: the shift is the same constant log(3 / 4) for every item, so logQ changes nothing
    uni = objective("--loss", "sampled_softmax", "--num_negatives", "3")
    torch.testing.assert_close(uni.log_expected_count(NegativeSampler(4), 1)[1:], torch.full((4,), math.log(3 / 4)))


def test_sampled_softmax_in_batch_positives_join_the_pool():
    # two rows: states +x (positive item 1) and +y (positive item 2); no sampled negative but item 4
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pos = torch.tensor([[1, 2]])
    obj = objective("--loss", "sampled_softmax", "--num_negatives", "1", "--in_batch_negatives",
                    "--no-logq_correction")
    loss = call(obj, states, pos, draws=torch.tensor([4]))
    # pool [4, 1, 2]; each row's own positive is masked: row 1 sees items 4 and 2 (logits 0, 0),
    # row 2 sees items 4 and 1 (logits -1, 0)
    row1 = -1 + math.log(E + 1 + 1)
    row2 = -2 + math.log(E ** 2 + E ** -1 + 1)
    assert abs(loss.item() - (row1 + row2) / 2) < 1e-6


def test_a_mixed_pool_is_corrected_by_each_items_expected_count_from_both_sources():
    """In-batch positives (drawn by the log: their share at alpha 1) plus N negatives drawn by (count + 1) ^ 0.5:
    every logit, the positive's included, minus log(N q_sampler + R q_log); accidental hits masked."""
    counts = (0, 3, 1, 0, 0)
    flags = ("--loss", "sampled_softmax", "--num_negatives", "1", "--neg_sampler", "popularity",
             "--popularity_alpha", "0.5", "--in_batch_negatives")
    q_sampler = torch.tensor([2.0, 2 ** 0.5, 1.0, 1.0]) / (4 + 2 ** 0.5)
    q_log = torch.tensor([.5, .25, .125, .125])
    sampler = NegativeSampler(4, popularity(counts, 0.5))
    torch.testing.assert_close(sampler.q[1:], q_sampler)
    obj = objective(*flags, counts=counts)
    expected = 1 * q_sampler + 2 * q_log  # one draw, two in-batch rows
    torch.testing.assert_close(obj.log_expected_count(sampler, 2)[1:], torch.log(expected))
    log_e = {item: math.log(expected[item - 1].item()) for item in (1, 2, 4)}
    states, pos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[1, 2]])
    loss = call(obj, states, pos, draws=torch.tensor([4]), sampler=sampler)
    # pool [4, 1, 2]; row 1 (+x, positive 1): item 4 scores 0, item 2 scores 0, item 1 is its own (masked)
    p1, negs1 = 1 - log_e[1], [0 - log_e[4], 0 - log_e[2]]
    # row 2 (+y, positive 2, logit 2): item 4 scores -1, item 1 scores 0, item 2 masked
    p2, negs2 = 2 - log_e[2], [-1 - log_e[4], 0 - log_e[1]]
    rows = [-p + math.log(E ** p + sum(E ** n for n in negs)) for p, negs in ((p1, negs1), (p2, negs2))]
    assert abs(loss.item() - sum(rows) / 2) < 1e-5


def test_hard_negatives_keep_the_highest_scoring():
    # CE logits for positive item 1: negatives [0, -3, 0]; K=1 keeps one 0
    states, pos = one_row(1)
    loss = call(objective("--loss", "ce", "--hard_negatives", "1"), states, pos)
    assert abs(loss.item() - (-1 + math.log(E + 1))) < 1e-6


def test_the_hard_negative_curriculum_moves_k_linearly_then_holds_it():
    curriculum = build_config(["--loss", "sampled_softmax", "--hard_negatives", "512", "--hard_negatives_to", "64",
                               "--hard_negatives_steps", "1000"]).loss
    assert [hard_negatives_at(curriculum, s) for s in (0, 250, 500, 999, 1000, 5000)] == [512, 400, 288, 64, 64, 64]
    rising = build_config(["--loss", "ce", "--hard_negatives", "1", "--hard_negatives_to", "4",
                           "--hard_negatives_steps", "3"]).loss
    assert [hard_negatives_at(rising, s) for s in range(5)] == [1, 2, 3, 4, 4]
    constant = build_config(["--loss", "ce", "--hard_negatives", "7"]).loss
    assert hard_negatives_at(constant, 10 ** 6) == 7  # no curriculum: constant


def test_gbce_beta_and_t0_equals_bce():
    assert gbce_beta(256, 12_101, 0.0) == pytest.approx(1.0)
    assert gbce_beta(256, 12_101, 1.0) == pytest.approx(256 / 12_100)
    assert gbce_beta(256, 12_101, 0.75) == pytest.approx(0.75 * 256 / 12_100 + 0.25)  # t alpha + (1 - t)
    states, pos = one_row(2, state=(1.0, 1.0))  # positive logit 2; negatives 1 -> 1, 3 -> -3
    for t, beta in ((0.0, 1.0), (0.5, gbce_beta(2, 4, 0.5))):
        obj = objective("--loss", "gbce", "--num_negatives", "2", "--gbce_t", str(t))
        loss = call(obj, states, pos, draws=torch.tensor([[1, 3]]))  # (sequences, N)
        expected = beta * math.log(1 + E ** -2) + math.log(1 + E) + math.log(1 + E ** -3)
        assert abs(loss.item() - expected) < 1e-6
        if t == 0.0:  # plain BCE on the same logits
            torch.testing.assert_close(loss, bce_loss(torch.tensor([2.0]), torch.tensor([[1.0, -3.0]])))


def test_gbce_negatives_are_per_sequence_and_hits_masked_in_their_own_sequence():
    """Two sequences, two real positions each, each sequence its own 2 negatives (items 1..4: +x, +2y, -3x, -y).
    Sequence 0 (states +x, +y; positives 1, 2) draws [2, 3]: item 2 is the second row's positive, masked
    there only. Sequence 1 (states +y, -x; positives 4, 3) draws [4, 4]: both masked for its first row."""
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    pos = torch.tensor([[1, 2], [4, 3]])
    obj = objective("--loss", "gbce", "--num_negatives", "2", "--gbce_t", "0")
    out = call(obj, states, pos, draws=torch.tensor([[2, 3], [4, 4]]), with_logits=True)
    loss, pos_logits, neg_logits = out.loss, out.pos_logits, out.neg_logits
    assert call.shapes == [(2, 2)]
    def sp(x):  # softplus
        return math.log(1 + E ** x)
    rows = [sp(-1) + sp(0) + sp(-3),     # state +x: positive 1 -> 1; negatives 2 -> 0, 3 -> -3
            sp(-2) + sp(0),              # state +y: positive 2 -> 2; negative 2 masked, 3 -> 0
            sp(1),                       # state +y: positive 4 -> -1; both negatives (4) masked
            sp(-3) + 2 * sp(0)]          # state -x: positive 3 -> 3; negatives 4 -> 0, 0
    assert abs(loss.item() - sum(rows) / 4) < 1e-6
    assert pos_logits.tolist() == [1.0, 2.0, -1.0, 3.0] and sorted(neg_logits.tolist()) == [-3.0, 0.0, 0.0, 0.0, 0.0]


def test_learnable_temperature_gets_gradient_and_stays_in_range():
    obj = objective("--use_infonce", "--learn_temperature", "--temperature", "0.1")
    assert [n for n, _ in obj.named_parameters()] == ["similarity.log_temperature"]
    states = torch.tensor([[[1.0, 0.0], [1.0, 0.2]]])
    call(obj, states, torch.tensor([[1, 2]]), torch.tensor([[3, 4]])).backward()
    sim = obj.similarity
    assert sim.log_temperature.grad is not None and sim.log_temperature.grad.abs().item() > 0
    with torch.no_grad():
        sim.log_temperature.fill_(math.log(1e-5))
    assert sim.temperature().item() == pytest.approx(0.01)
    with torch.no_grad():
        sim.log_temperature.fill_(5.0)
    assert sim.temperature().item() == pytest.approx(1.0)
    # a fixed temperature is a buffer, not a parameter, and is not clamped
    fixed = objective("--use_infonce", "--temperature", "0.005")
    assert list(fixed.parameters()) == [] and fixed.similarity.temperature().item() == pytest.approx(0.005)


def test_l2_emb_adds_item_table_norm():
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pos, neg = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    l0 = TrainStep(FixedStates(states), objective(), None)(batch_of(pos, neg)).loss
    l1 = TrainStep(FixedStates(states), objective(), None, l2_emb=0.5)(batch_of(pos, neg)).loss
    assert abs((l1 - l0).item() - 0.5 * math.sqrt(1 + 4 + 9 + 1)) < 1e-6


@pytest.mark.parametrize("loss_name", LOSSES)
def test_every_loss_logs_logit_statistics_and_trains(loss_name):
    from config import ModelConfig
    from model import SASRec
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=30, maxlen=6, hidden_units=8, num_blocks=1, num_heads=1, dropout_rate=0.0))
    obj = objective("--loss", loss_name, "--num_negatives", "8", counts=np.arange(31))
    seq = torch.randint(1, 31, (4, 6))
    pos, neg = torch.randint(1, 31, (4, 6)), torch.randint(1, 31, (4, 6))
    pos[0, :3] = 0  # padding
    rows = (pos != 0).view(-1).nonzero().squeeze(1)
    out = TrainStep(model, obj, NegativeSampler(30))(Batch(seq, pos, torch.arange(4), rows, neg), with_logits=True)
    assert torch.isfinite(out.loss) and out.pos_logits.shape == (21,) and out.neg_logits.numel() > 0
    out.loss.backward()
    assert model.item_tower.id_emb.weight.grad.abs().sum() > 0


def test_symmetric_infonce_hand_computed_2x3():
    """--symmetric adds the item-to-sequence direction: each positive item against the batch's states."""
    from types import SimpleNamespace

    from objectives.losses import InfoNCE, Similarity
    table = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])  # items 1..4
    states = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0]])
    pos_ids, negatives = torch.tensor([1, 2]), SimpleNamespace(per_position=torch.tensor([3, 4]))
    c = 1 / math.sqrt(2)
    forward = [-1 + math.log(E + 1 + E ** c),                   # state 1: item 1 (cos 1) vs items 3 (0), 4 (c)
               -0.8 + math.log(E ** 0.8 + 1 + E ** (1.4 * c))]  # state 2: item 2 (0.8) vs 3 (0), 4 (1.4 c)
    backward = [-1 + math.log(E + E ** 0.6),                   # item 1: state 1 (1) vs state 2 (0.6)
                -0.8 + math.log(E ** 0.8 + 1)]                 # item 2: state 2 (0.8) vs state 1 (0)
    loss = lambda symmetric: InfoNCE(Similarity(True, 1.0), symmetric=symmetric)(  # noqa: E731
        states, pos_ids, lambda ids: table[ids], negatives).loss.item()
    assert loss(False) == pytest.approx(sum(forward) / 2, rel=1e-6)
    assert loss(True) == pytest.approx((sum(forward) / 2 + sum(backward) / 2) / 2, rel=1e-6)
    assert build_config(["--use_infonce", "--symmetric"]).loss.symmetric


def test_per_position_sampled_softmax_hand_computed_and_chunk_free():
    """--negatives_per_position: each row its own N negatives; a negative equal to the positive is masked.
    Both routes (vectors gathered per row; the whole table's logits, then picked) give the same loss and
    gradients, whole or in chunks."""
    from types import SimpleNamespace

    from objectives.losses import PerPositionSampledSoftmax, Similarity
    table = torch.tensor([[0.0, 0], [1, 0], [0, 1], [-1, 0], [1, 1]], requires_grad=True)  # items 1..4

    class Tower:
        num_items = 4

        def __call__(self, ids=None):
            return table if ids is None else table[ids]
    states = torch.tensor([[1.0, 0], [0, 2]], requires_grad=True)
    drawn = torch.tensor([[2, 3], [4, 2]])  # row 2's second negative is its positive (item 2): masked
    negatives = SimpleNamespace(draw=lambda shape, device: drawn[:, :shape[1]])
    row1 = -1 + math.log(E + 1 + E ** -1)    # dot: positive 1, negatives item 2 (0), item 3 (-1)
    row2 = -2 + math.log(E ** 2 + E ** 2)    # positive 2, negative item 4 (2); item 2 masked
    results = []
    for dense in (0, 100):
        for chunk in (None, 4):  # 4 elements: one row per chunk on either route
            loss = PerPositionSampledSoftmax(Similarity(False), 2, chunk_elems=chunk)
            loss.DENSE_ITEMS_PER_NEGATIVE = dense
            out = loss(states, torch.tensor([1, 2]), Tower(), negatives)
            assert out.loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
            results.append(torch.autograd.grad(out.loss, [states, table]))
    for grads in results[1:]:
        for a, b in zip(results[0], grads, strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(SystemExit):
        exits(build_config)(["--loss", "sampled_softmax", "--negatives_per_position", "--neg_sampler", "popularity"])


def test_negative_queue_is_a_fifo_of_earlier_pools_with_hits_masked():
    """--negative_queue N: after a few steps the queue holds the last N pool entries (ids and the vectors
    as computed then), oldest first, as a hand-simulated FIFO; a queued copy of a row's positive is masked."""
    from types import SimpleNamespace

    from objectives.losses import InfoNCE, Similarity
    from objectives.negative_queue import NegativeQueue
    queue = NegativeQueue(5, 2)
    fifo = []  # (id, vector) by hand
    for step, ids in enumerate(([3, 1, 4], [1, 5], [9, 2, 6, 5])):
        vectors = torch.tensor([[float(i), float(step)] for i in ids])
        queue.extend(vectors, torch.tensor(ids))
        fifo = (fifo + [(i, [float(i), float(step)]) for i in ids])[-5:]
        got_vectors, got_ids = queue.contents()
        assert got_ids.tolist() == [i for i, _ in fifo]
        assert got_vectors.tolist() == [v for _, v in fifo]
    pool, pool_ids, _ = queue.extend(torch.zeros(1, 2), torch.tensor([0]))  # a gathered pool's padding
    assert sorted(pool_ids.tolist()) == sorted([0] + [i for i, _ in fifo]) and queue.contents()[1].tolist() == \
        [i for i, _ in fifo]  # the pool gets the queue; padding (id 0) is not queued

    table = torch.tensor([[0.0, 0], [1, 0], [0, 1], [-1, 0]])  # items 1..3, dot logits
    loss = InfoNCE(Similarity(False), queue=NegativeQueue(4, 2))
    step = lambda pool_ids: loss(torch.tensor([[2.0, 0]]), torch.tensor([1]), lambda ids: table[ids],  # noqa: E731
                                 SimpleNamespace(per_position=torch.tensor(pool_ids))).loss.item()
    assert step([1]) == pytest.approx(0.0, abs=1e-6)  # the only negative is the positive itself: masked
    assert step([2]) == pytest.approx(-2 + math.log(E ** 2 + 1), rel=1e-6)  # item 2 (logit 0); queued 1 masked
    assert step([3]) == pytest.approx(-2 + math.log(E ** 2 + E ** -2 + 1), rel=1e-6)  # item 3 (-2), queued 2
    with pytest.raises(SystemExit):
        exits(build_config)(["--loss", "bce", "--negative_queue", "64"])


def test_queue_and_loss_schedule_build_from_flags():
    """--negative_queue gives the softmax losses a queue of the item width; --loss_schedule stages share one
    similarity, switch at the stated epoch, and the schedule's last stage is the run's loss."""
    from objectives.losses import InfoNCE, ScheduledLoss
    config = build_config(["--loss_schedule", "bce:2,sampled_softmax:1,infonce", "--negative_queue", "8"])
    assert config.loss.loss == "infonce" and config.loss.similarity == "cosine"
    loss = build_loss(config.loss, np.ones(5), dim=3)
    assert isinstance(loss, ScheduledLoss) and [loss.name(e) for e in range(1, 6)] == \
        ["bce", "bce", "sampled_softmax", "infonce", "infonce"]
    assert all(stage.similarity is loss.similarity for stage in loss.stages)
    assert loss.stages[1].queue is loss.stages[2].queue and loss.stages[2].queue.vectors.shape == (8, 3)
    assert loss.per_position_negatives  # bce and infonce need the batch's per-position negatives
    assert isinstance(build_loss(build_config(["--use_infonce"]).loss, np.ones(5)), InfoNCE)
    for bad in (["--loss_schedule", "bce,infonce"], ["--loss_schedule", "bce:x,infonce"],
                ["--loss_schedule", "bce:2,infonce:3"], ["--loss_schedule", "bce:2,infonce", "--loss", "ce"]):
        with pytest.raises(SystemExit):
            exits(build_config)(bad)
