"""--optimizer adam | adamw | muon (training/optim.py): which parameters Muon trains, that its step is
torch.optim.Muon's orthogonalised update, that adamw / muon runs resume bit-exactly, that a checkpoint is
resumed only with its own optimizer, and that adam (the default) is the optimizer it always was."""
import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from cli import exits
from config import build_config
from conftest import TINY, fails_with
from main import main
from model import SASRec
from objectives.losses import build_loss
from training.optim import MuonAdamW, build_optimizer, hidden_matrices, set_weight_decay, split_parameters

parse_args = exits(build_config)
CPU = torch.device("cpu")
ITEM_SIDE = {"features": [{"name": "cat", "vocab_size": 7, "width": 2}], "vectors": [{"name": "mm", "dim": 6}]}
USER_SIDE = {"features": [{"name": "age", "vocab_size": 5, "width": 1}], "vectors": []}


def small(encoder, *flags):
    """(model, loss, train config) of a small model with every kind of module: item / user towers with dense
    layers of their own, action and time embeddings, a relative bias inside the layers, a learnt temperature."""
    config = build_config(["--encoder", encoder, "--hidden_units", "8", "--num_heads", "2", "--num_blocks", "2",
                           "--maxlen", "6", "--attn_bias", "position", "--time_features", "--use_infonce",
                           "--learn_temperature", *flags])
    model = SASRec(dataclasses.replace(config.model, num_items=20, item_side=ITEM_SIDE, user_side=USER_SIDE,
                                       num_actions=3))
    return model, build_loss(config.loss, np.ones(21)), config.train


EXPECTED_MATRICES = {
    "sasrec": {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "ffn.0", "ffn.3")},
    "hstu": {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("uvqk", "out")},
}


@pytest.mark.parametrize("encoder", ["sasrec", "hstu"])
def test_muon_trains_exactly_the_layers_weight_matrices_and_adamw_everything_else(encoder):
    model, loss, train = small(encoder, "--optimizer", "muon")
    assert set(hidden_matrices(model)) == EXPECTED_MATRICES[encoder]
    matrices, rest = split_parameters(model, loss)
    assert {name for name, _ in matrices} == EXPECTED_MATRICES[encoder]
    names = [name for name, _ in rest]
    every_name = [n for n, _ in model.named_parameters()] + [f"loss.{n}" for n, _ in loss.named_parameters()]
    assert sorted(names) == sorted(set(every_name) - EXPECTED_MATRICES[encoder])
    for kept in ("loss.similarity.log_temperature", "pos_emb.weight", "item_tower.id_emb.weight",
                 "item_tower.vector_default", "item_tower.fuse.weight", "item_tower.vector_proj.0.weight",
                 "user_tower.fuse.weight", "context.time_emb.0.weight", "context.action_emb.weight",
                 "last_norm.weight", *{"hstu": ["blocks.0.rel_bias.position", "blocks.1.out.bias"],
                                       "sasrec": ["blocks.0.attn.rel_bias.position", "blocks.1.ffn.0.bias",
                                                  "blocks.1.ffn_norm.weight"]}[encoder]):
        assert kept in names, kept  # embeddings, towers' dense layers, biases, norms, the loss's: AdamW
    everything = [*model.parameters(), *loss.parameters()]
    optimizer = build_optimizer(model, loss, train, CPU)
    assert isinstance(optimizer, MuonAdamW)
    muon_ids = [id(p) for g in optimizer.muon.param_groups for p in g["params"]]
    adamw_ids = [id(p) for g in optimizer.adamw.param_groups for p in g["params"]]
    assert muon_ids == [id(p) for _, p in matrices] and all(p.ndim == 2 for _, p in matrices)
    assert sorted(muon_ids + adamw_ids) == sorted(id(p) for p in everything)  # none missing, none twice
    group = optimizer.muon.param_groups[0]
    assert (group["adjust_lr_fn"], group["weight_decay"]) == ("match_rms_adamw", 0.0)
    assert optimizer.adamw.param_groups[0]["betas"] == (0.9, 0.98)


def test_a_muon_step_is_torch_muons_orthogonalised_update_and_adamw_steps_the_rest():
    lr, wd = 0.02, 0.1
    model, loss, train = small("sasrec", "--optimizer", "muon", "--lr", str(lr), "--weight_decay", str(wd))
    optimizer = build_optimizer(model, loss, train, CPU)
    reference = copy.deepcopy((model, loss))
    generator = torch.Generator().manual_seed(0)
    matrices = hidden_matrices(model)
    for name, p in [*model.named_parameters(), *loss.named_parameters()]:
        if name in matrices:  # an ill-conditioned gradient: singular values from 1 down to 0.01
            u, _ = torch.linalg.qr(torch.randn(p.shape[0], min(p.shape), generator=generator))
            v, _ = torch.linalg.qr(torch.randn(p.shape[1], min(p.shape), generator=generator))
            p.grad = u @ torch.diag(torch.logspace(0, -2, min(p.shape))) @ v.T
        else:
            p.grad = torch.randn(p.shape, generator=generator)
    ref_model, ref_loss = reference
    for (_, p), (_, q) in zip([*model.named_parameters(), *loss.named_parameters()],
                              [*ref_model.named_parameters(), *ref_loss.named_parameters()], strict=True):
        q.grad = p.grad.clone()
    before = {name: p.detach().clone() for name, p in matrices.items()}
    for group in optimizer.param_groups:  # as the lr schedule sets it: every group of both optimizers
        group["lr"] = lr
    optimizer.step()

    ref_matrices, ref_rest = split_parameters(ref_model, ref_loss)
    torch.optim.Muon([p for _, p in ref_matrices], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw").step()
    decays = [p for n, p in ref_rest if p.ndim >= 2 and not n.startswith("loss.")]  # tables decay, vectors not
    kept = [p for n, p in ref_rest if not (p.ndim >= 2 and not n.startswith("loss."))]
    torch.optim.AdamW([{"params": decays, "weight_decay": wd}, {"params": kept, "weight_decay": 0.0}], lr=lr,
                      betas=(0.9, 0.98), fused=True).step()
    for (name, p), (_, q) in zip([*model.named_parameters(), *loss.named_parameters()],
                                 [*ref_model.named_parameters(), *ref_loss.named_parameters()], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        assert name not in matrices or not torch.equal(p, before[name]), name  # it moved
    for name, p in matrices.items():  # the step minus the decay is a near-orthogonal matrix times Muon's rate
        rate = lr * 0.2 * max(p.shape) ** 0.5  # match_rms_adamw
        update = (before[name] * (1 - lr * wd) - p.detach()) / rate
        singular = torch.linalg.svdvals(update)
        # the gradient's condition number is 100; Newton-Schulz leaves singular values near 1 (~0.7-1.15 here)
        assert singular.max() < 1.3 and singular.min() > 0.5 and singular.max() / singular.min() < 2, (name, singular)


def test_the_lr_schedule_and_a_resumed_weight_decay_reach_both_optimizers():
    model, loss, train = small("hstu", "--optimizer", "muon", "--weight_decay", "0.05")
    optimizer = build_optimizer(model, loss, train, CPU)
    for group in optimizer.param_groups:
        group["lr"] = 0.123
    assert {g["lr"] for o in (optimizer.muon, optimizer.adamw) for g in o.param_groups} == {0.123}
    assert len(optimizer.param_groups) == len(optimizer.muon.param_groups) + len(optimizer.adamw.param_groups)
    saved = optimizer.state_dict()
    assert (saved["kind"], sorted(saved)) == ("muon", ["adamw", "kind", "muon"])
    other = build_optimizer(model, loss, dataclasses.replace(train, weight_decay=0.0), CPU)
    other.load_state_dict(saved)
    decaying = lambda o: [g["weight_decay"] for g in o.param_groups if not g.get("no_decay")]  # noqa: E731
    assert set(decaying(other)) == {0.05}  # loading restores the saved groups
    assert [g["weight_decay"] for g in other.param_groups if g.get("no_decay")] == [0.0]  # vectors never decay
    set_weight_decay(other, 0.01)  # what restore() does next: --weight_decay given at resume wins
    assert set(decaying(other.muon)) | set(decaying(other.adamw)) == {0.01}
    assert [g["weight_decay"] for g in other.param_groups if g.get("no_decay")] == [0.0]


@pytest.mark.parametrize("flags", [["--optimizer", "muon", "--weight_decay", "0.01"],
                                   ["--optimizer", "adamw", "--weight_decay", "0.01"]], ids=["muon", "adamw"])
def test_resume_continues_exactly(tmp_path, flags):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(TINY + flags + ["--num_epochs", "2", "--run_dir", straight])
    main(TINY + flags + ["--num_epochs", "1", "--run_dir", split])
    main(["--num_epochs", "2", "--state_dict_path", os.path.join(split, "ckpt")])  # its optimizer from config.json
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    if flags[1] == "muon":
        assert a["optimizer"]["kind"] == "muon" and len(a["optimizer"]["muon"]["state"]) == 4  # qkv, proj, ffn x2
        for part in ("muon", "adamw"):
            torch.testing.assert_close(a["optimizer"][part]["state"], b["optimizer"][part]["state"], rtol=0, atol=0)
    else:
        assert a["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
        torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)


@pytest.mark.parametrize("trained, resumed", [("adam", "muon"), ("adam", "adamw"), ("muon", "adam"),
                                              ("adamw", "muon")])
def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path, capsys, trained, resumed):
    run = str(tmp_path / "run")
    main(TINY + ["--optimizer", trained, "--num_epochs", "1", "--run_dir", run])
    capsys.readouterr()
    fails_with(capsys, main, ["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2",
                              "--optimizer", resumed],
               f"--optimizer {resumed}: the checkpoint {os.path.join(run, 'ckpt', 'last.pt')} was trained with "
               f"--optimizer {trained}")


def test_adam_is_the_default_and_unchanged():
    model, loss, train = small("sasrec")
    assert (train.optimizer, train.weight_decay) == ("adam", 0.0)
    optimizer = build_optimizer(model, loss, train, CPU)
    assert type(optimizer) is torch.optim.Adam
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["lr"], group["fused"]) == ((0.9, 0.98), 0, 0.001, True)
    assert [id(p) for p in group["params"]] == [id(p) for p in [*model.parameters(), *loss.parameters()]]
    assert len(optimizer.param_groups) == 1
    adamw = build_optimizer(model, loss, dataclasses.replace(train, optimizer="adamw", weight_decay=0.01), CPU)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("flags, message", [(["--weight_decay", "-1", "--optimizer", "adamw"], "--weight_decay"),
                                            (["--weight_decay", "0.1"], "--weight_decay"),  # adam has none
                                            (["--optimizer", "sgd"], "--optimizer")])
def test_bad_optimizer_flags_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
