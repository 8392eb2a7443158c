import dataclasses

import pytest
import torch

from config import ModelConfig, build_config
from dataset import Batch
from model import SASRec
from objectives.losses import build_loss
from objectives.samplers import NegativeSampler
from training.loop import TrainStep


def make_model(**kw):
    torch.manual_seed(0)
    return SASRec(ModelConfig(num_items=20, maxlen=6, hidden_units=8, num_blocks=2, num_heads=2, dropout_rate=0.3,
                              **kw)).eval()


def test_causality_future_items_do_not_change_earlier_states():
    for norm_first in (True, False):
        model = make_model(norm_first=norm_first)
        a = torch.tensor([[0, 3, 4, 5, 6, 7]])
        b = torch.tensor([[0, 3, 4, 5, 9, 1]])
        sa, sb = model(a), model(b)
        torch.testing.assert_close(sa[:, :4], sb[:, :4])
        assert not torch.allclose(sa[:, 4:], sb[:, 4:])


def test_padding_is_zero_and_does_not_leak():
    for norm_first in (True, False):  # padding is zeroed only at the output: no block may let it leak
        model = make_model(norm_first=norm_first)
        short = torch.tensor([[3, 4, 5]])
        padded = torch.tensor([[0, 0, 0, 3, 4, 5]])
        states = model(padded)
        assert (states[:, :3] == 0).all()
        # extra left padding (a wider batch) leaves the real positions' states unchanged
        torch.testing.assert_close(states[:, 3:], model(short), rtol=1e-5, atol=1e-6)


def test_user_and_item_embeddings():
    model = make_model()
    seqs = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]])
    users = model.user_embeddings(seqs)
    torch.testing.assert_close(users, model(seqs)[:, -1])
    assert model.item_embeddings().shape == (21, 8)
    ids = torch.tensor([3, 4])
    torch.testing.assert_close(model.score(seqs, ids), users @ model.item_embeddings(ids).T)


def test_dropout_only_in_training():
    model = make_model()
    seqs = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(seqs), model(seqs))
    model.train()
    assert not torch.allclose(model(seqs), model(seqs))


def test_cpu_dropout_keeps_the_rate_and_the_mean_and_follows_torch_seed():
    from model import Dropout
    drop, x = Dropout(0.3).train(), torch.ones(200, 500)
    torch.manual_seed(3)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (256 - 77) / 256) < 0.01  # p rounded to 77 / 256
    assert abs(y.mean().item() - 1) < 0.01 and y.unique().tolist() == [0.0, pytest.approx(256 / 179)]
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), y, rtol=0, atol=0)  # reproducible from torch's seed
    assert drop.eval()(x) is x


def test_cosine_scores_ignore_item_norms():
    model = make_model()
    seqs = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        model.item_tower.id_emb.weight[5] = 10 * model.item_tower.id_emb.weight[4]  # same direction, 10x the norm
    dot, cos = model.score(seqs), model.score(seqs, normalize=True)
    torch.testing.assert_close(dot[0, 5], 10 * dot[0, 4])
    torch.testing.assert_close(cos[0, 5], cos[0, 4])
    assert cos.abs().max() <= 1 + 1e-6


def test_separate_output_table_scores_outputs_and_inputs_keep_theirs():
    """--output_emb separate: states are scored against a table of its own; the input table only feeds the
    sequence. One gbce step sends the targets' gradient to the output table and the inputs' to the input one."""
    model = make_model(output_emb="separate").train()
    out_table, in_table = model.output_tower.id_emb.weight, model.item_tower.id_emb.weight
    assert out_table.shape == (21, 8) and (out_table[0] == 0).all()
    assert not torch.equal(out_table, in_table)
    seqs = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]])
    torch.testing.assert_close(model.item_embeddings(), out_table)
    model.eval()
    torch.testing.assert_close(model.score(seqs), model.user_embeddings(seqs) @ out_table.T)
    model.train()
    loss = build_loss(build_config(["--loss", "gbce", "--num_negatives", "4"]).loss, [0] + [1] * 20)
    pos = torch.tensor([[0, 0, 2, 3], [6, 7, 8, 9]])
    torch.manual_seed(1)
    batch = Batch(seqs, pos, torch.arange(2), (pos != 0).view(-1).nonzero().squeeze(1))
    TrainStep(model, loss, NegativeSampler(20))(batch).loss.backward()
    in_rows = in_table.grad.abs().sum(1).nonzero().flatten().tolist()
    assert in_rows == [1, 2, 5, 6, 7, 8]  # exactly the items in the input sequences
    assert out_table.grad[[2, 3, 6, 7, 8, 9]].abs().sum(1).gt(0).all()  # every positive
    assert out_table.grad[0].abs().sum() == 0


def test_item_emb_dropout_one_mask_per_step_shared_by_inputs_and_targets():
    """--item_emb_dropout: inside a training step an item's vector is its row of one dropped table (each element
    zeroed or x 1 / (1 - p)) wherever it is used; each step draws a new mask; outside a step and in evaluation
    the table is untouched. A whole step's gradient is zero exactly on the dropped elements."""
    model = make_model(item_emb_dropout=0.5).train()
    tower, table = model.item_tower, model.item_tower.id_emb.weight
    ids = torch.tensor([3, 4, 3])
    with tower.dropout_step():
        dropped = tower()
        torch.testing.assert_close(tower(ids), dropped[ids])
        kept = dropped != 0
        torch.testing.assert_close(dropped[kept], 2 * table[kept])  # p = 0.5 is exact on the byte grid
        assert 0.3 < kept[1:].float().mean() < 0.7 and not kept[0].any()
    with tower.dropout_step():
        assert not torch.equal(tower() != 0, kept)
    torch.testing.assert_close(tower(ids), table[ids])
    model.eval()
    with tower.dropout_step():
        torch.testing.assert_close(tower(ids), table[ids])

    model.train()
    loss = build_loss(build_config(["--loss", "gbce", "--num_negatives", "4"]).loss, [0] + [1] * 20)
    seqs, pos = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]]), torch.tensor([[0, 0, 2, 3], [6, 7, 8, 9]])
    batch = Batch(seqs, pos, torch.arange(2), (pos != 0).view(-1).nonzero().squeeze(1))
    torch.manual_seed(3)  # the step's first draw is its table mask: replayed below
    TrainStep(model, loss, NegativeSampler(20))(batch).loss.backward()
    torch.manual_seed(3)
    with tower.dropout_step():
        kept = tower() != 0
    assert (table.grad[~kept] == 0).all()
    assert (table.grad[kept] != 0).sum() > 0


def test_separate_output_refuses_side_information():
    spec = {"features": [{"vocab_size": 3, "width": 1}], "vectors": []}
    with pytest.raises(ValueError, match="--output_emb separate is for id embeddings only"):
        make_model(output_emb="separate", item_side=spec)


def test_encode_reads_the_batch_inputs_and_from_checkpoint_rebuilds_the_model():
    from training import checkpoint
    model = make_model(norm_first=False)
    seqs = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]])
    batch = Batch(seqs, seqs, torch.arange(2), (seqs != 0).view(-1).nonzero().squeeze(1))
    torch.testing.assert_close(model.encode(batch), model(seqs))
    saved = {"format": checkpoint.FORMAT, "model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    rebuilt = SASRec.from_checkpoint(saved)
    assert rebuilt.config == dataclasses.replace(model.config, dropout_rate=0.0) and not rebuilt.training
    torch.testing.assert_close(rebuilt.score(seqs), model.score(seqs), rtol=0, atol=0)
