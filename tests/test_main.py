import json
import os
import subprocess
import sys

import pytest
import torch

from cli import exits
from config import build_config
from conftest import ROOT, shared_file, write
from main import main
from training.loop import LoopState, learning_rate

parse_args = exits(build_config)  # as main() runs it: a bad flag is one line on stderr and exit status 2

TINY = ["--data", "synthetic", "--device", "cpu", "--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1",
        "--batch_size", "256",
        "--eval_every", "1"]


def test_config_sets_defaults_and_flags_override(tmp_path):
    cfg = write(tmp_path, "c.toml", 'batch_size = 7\nhidden_units = 16\nnum_heads = 2\nnorm_first = false\n'
                'use_infonce = true\nlr = 1\n')
    c = parse_args(["--config", cfg, "--batch_size", "9"])
    assert (c.train.batch_size, c.model.hidden_units, c.model.num_heads, c.model.norm_first, c.loss.loss) == \
        (9, 16, 2, False, "infonce")
    assert isinstance(c.train.lr, float)
    assert parse_args(["--config", cfg, "--norm_first"]).model.norm_first is True


def test_config_loss_tables_follow_the_chosen_loss(tmp_path):
    cfg = write(tmp_path, "c.toml", 'hidden_units = 32\n[bce]\nlr = 0.002\n[infonce]\nlr = 0.0005\n'
                'infonce_temperature = 0.05\n[sampled_softmax]\nlr = 0.003\nnum_negatives = 64\n')
    bce = parse_args(["--config", cfg])
    assert (bce.loss.loss, bce.train.lr, bce.loss.temperature, bce.model.hidden_units, bce.loss.similarity) == \
        ("bce", 0.002, 0.1, 32, "dot")
    nce = parse_args(["--config", cfg, "--use_infonce"])  # old key name infonce_temperature still accepted
    assert (nce.loss.loss, nce.train.lr, nce.loss.temperature, nce.loss.similarity) == ("infonce", 0.0005, 0.05,
                                                                                       "cosine")
    assert parse_args(["--config", cfg, "--use_infonce", "--lr", "0.1"]).train.lr == 0.1  # the command line wins
    ss = parse_args(["--config", cfg, "--loss", "sampled_softmax"])
    assert (ss.train.lr, ss.loss.num_negatives, ss.loss.loss) == (0.003, 64, "sampled_softmax")
    # a file can choose its loss; the command line's choice beats it
    chosen = write(tmp_path, "ce.toml", 'loss = "sampled_softmax"\n[sampled_softmax]\nlr = 0.003\n')
    assert (parse_args(["--config", chosen]).train.lr, parse_args(["--config", chosen, "--loss", "ce"]).loss.loss) == \
        (0.003, "ce")


def test_config_is_frozen_and_flat_round_trips():
    import dataclasses
    c = parse_args(["--hidden_units", "24", "--loss", "gbce"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.model.hidden_units = 8
    flat = c.flat()
    assert flat["hidden_units"] == 24 and flat["loss"] == "gbce" and flat["item_features"] == ()
    assert len(flat) == sum(len(dataclasses.fields(getattr(c, f.name))) for f in dataclasses.fields(c))


CONFIGS = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFIGS) if n.endswith(".toml")))
def test_shipped_config_resolves(name):
    c = parse_args(["--config", os.path.join(CONFIGS, name), "--data", "synthetic"])
    assert c.data.data == "synthetic"  # every key known and of its type, the command line still wins


def test_default_config_is_the_documented_recipe():
    c = parse_args(["--config", os.path.join(CONFIGS, "default.toml"), "--data", "synthetic"])
    assert (c.loss.loss, c.loss.temperature, c.model.hidden_units, c.train.loss_reduction, c.train.lr_schedule,
            c.train.patience, c.train.ema_decay) == ("infonce", 0.05, 256, "position", "plateau", 3, 0.999)


@pytest.mark.parametrize("text, message", [("batch_sise = 3\n", "unknown key 'batch_sise'"),
                                           ("loss = 'bce'\n[infonce]\ntemprature = 0.1\n",
                                            "unknown key [infonce] 'temprature'"),  # in a table not chosen
                                           ("batch_size = 'big'\n", "key 'batch_size' expects int")])
def test_bad_config_names_file_and_key(tmp_path, capsys, text, message):
    cfg = write(tmp_path, "bad.toml", text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", cfg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and message in err


@pytest.mark.parametrize("flags, message", [(["--hidden_units", "10", "--num_heads", "3"], "divisible by --num_heads"),
                                            (["--maxlen", "0"], "--maxlen must be >= 1"),
                                            (["--infonce_temperature", "0"], "--temperature must be > 0"),
                                            (["--use_infonce", "--loss", "ce"], "--use_infonce contradicts --loss ce"),
                                            (["--loss", "ce", "--learn_temperature"], "needs cosine logits"),
                                            (["--loss", "gbce", "--gbce_t", "2"], "--gbce_t must be in [0, 1]"),
                                            (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
                                            (["--loss", "sampled_softmax", "--neg_sampler", "popularity",
                                              "--popularity_alpha", "nan"], "--popularity_alpha must be in [0, 10]"),
                                            (["--loss", "sampled_softmax", "--popularity_alpha", "0.75"],
                                             "--popularity_alpha shapes --neg_sampler popularity"),
                                            (["--hard_negatives", "8", "--hard_negatives_steps", "10"],
                                             "--hard_negatives_steps is the length of a --hard_negatives_to"),
                                            (["--loss", "ce", "--hard_negatives", "8", "--hard_negatives_to", "2",
                                              "--hard_negatives_steps", "10", "--compile"], "not with --compile"),
                                            (["--loss", "bce", "--hard_negatives", "8"],
                                             "--hard_negatives keeps the hardest negatives of a softmax loss"),
                                            (["--predict_action", "2"], "give --next_action"),
                                            (["--optimizer", "adamw", "--weight_decay", "nan"],
                                             "--weight_decay must be finite and >= 0")])
def test_bad_flags_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_continues_exactly_and_inference_only_reproduces(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(TINY + ["--num_epochs", "3", "--run_dir", straight])
    main(TINY + ["--num_epochs", "2", "--run_dir", split])
    main(["--num_epochs", "3", "--state_dict_path", os.path.join(split, "ckpt")])  # resumes at epoch 3, no other flag
    a = torch.load(os.path.join(straight, "ckpt", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt", "last.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)
    # the saved config rebuilds nothing by hand, and --inference_only reproduces the final test metrics
    saved = json.load(open(os.path.join(straight, "ckpt", "config.json")))
    assert saved["hidden_units"] == 16 and saved["num_items"] == 3000
    main(["--state_dict_path", os.path.join(straight, "ckpt"), "--inference_only"])
    trained = json.load(open(os.path.join(straight, "results.json")))
    evaluated = json.load(open(os.path.join(straight, "eval_results.json")))
    assert evaluated["test"] == trained["test"]


def test_loss_schedule_switches_at_its_epoch_and_resumes_exactly_with_its_queue(tmp_path):
    """'bce:1,infonce': epoch 1 trains BCE, later epochs InfoNCE; a run stopped after epoch 1 and resumed
    ends bit-identical to the straight one, negative queue included."""
    flags = TINY + ["--loss_schedule", "bce:1,infonce", "--negative_queue", "300"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(flags + ["--num_epochs", "3", "--run_dir", straight])
    main(flags + ["--num_epochs", "1", "--run_dir", split])
    main(["--num_epochs", "3", "--state_dict_path", os.path.join(split, "ckpt")])
    for run in (straight, split):
        log = [json.loads(line) for line in open(os.path.join(run, "logs", "train.log"))]
        assert [r["loss_name"] for r in log] == ["bce", "infonce", "infonce"]
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert int(a["loss"]["stages.1.queue.pushed"]) > 300  # the queue filled and wrapped
    for k in [*a["model"], *a["loss"]]:
        torch.testing.assert_close({**a["model"], **a["loss"]}[k], {**b["model"], **b["loss"]}[k], rtol=0, atol=0)


def test_a_hard_negative_curriculum_resumes_exactly(tmp_path):
    """K is a function of the step (256 -> 8 over 16 steps, 8 steps an epoch): a run stopped after epoch 1 and
    resumed ends bit-identical to the straight one."""
    flags = TINY + ["--loss", "sampled_softmax", "--num_negatives", "300", "--in_batch_negatives", "--neg_sampler",
                    "popularity", "--popularity_alpha", "0.75", "--hard_negatives", "256", "--hard_negatives_to", "8",
                    "--hard_negatives_steps", "16", "--eval_every", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(flags + ["--num_epochs", "2", "--run_dir", straight])
    main(flags + ["--num_epochs", "1", "--run_dir", split])
    main(["--num_epochs", "2", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert a["step"] == b["step"] >= 16
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("loss_flags", [[], ["--use_infonce", "--infonce_temperature", "0.1"], ["--loss", "ce"],
                                        ["--loss", "sampled_softmax", "--in_batch_negatives", "--neg_sampler",
                                         "popularity", "--similarity", "cosine", "--learn_temperature"]])
def test_synthetic_beats_popularity_by_wide_margin(tmp_path, loss_flags):
    run = str(tmp_path / "run")
    main(["--data", "synthetic", "--num_epochs", "8", "--eval_every", "4", "--run_dir", run] + loss_flags)
    r = json.load(open(os.path.join(run, "results.json")))
    assert r["test"]["NDCG@10"] > 1.5 * r["popularity_test"]["NDCG@10"]
    assert os.listdir(os.path.join(run, "tb"))  # TensorBoard events were written


def test_end_to_end_on_real_data_beats_popularity(tmp_path):
    data = shared_file("Beauty.txt")
    run = str(tmp_path / "run")
    main(["--data", data, "--use_infonce", "--num_epochs", "3", "--eval_every", "3", "--hidden_units", "64",
          "--dropout_rate", "0.5", "--batch_size", "256", "--run_dir", run, "--cache_dir", str(tmp_path)])
    r = json.load(open(os.path.join(run, "results.json")))
    assert r["test"]["users"] == 22363
    assert r["test"]["NDCG@10"] > 1.5 * r["popularity_test"]["NDCG@10"]


def test_cosine_schedule_is_a_function_of_progress():
    cosine = parse_args(["--lr", "0.01", "--lr_schedule", "cosine", "--num_epochs", "2"]).train
    constant = parse_args(["--lr", "0.01"]).train
    for step, expected in ((0, 0.01), (10, 0.005), (20, 0.0), (30, 0.0)):  # 10 steps an epoch
        assert learning_rate(cosine, LoopState(step=step), 10) == pytest.approx(expected, abs=1e-12)
    assert learning_rate(constant, LoopState(step=7), 10) == 0.01


def test_plateau_schedule_decays_after_the_plateau_then_stops(tmp_path, capsys):
    """Constant lr until `patience` validations bring nothing better, then cosine to 0 over decay_fraction x
    the epochs so far, then stop; the decay is in the checkpoint, so a resumed run carries it on."""
    # --min_delta 1: only a doubled NDCG@10 is progress, so the plateau comes at the second validation
    flags = TINY + ["--use_infonce", "--lr", "0.05", "--lr_schedule", "plateau", "--patience", "1", "--min_delta",
                    "1.0", "--decay_fraction", "1.0", "--eval_every", "1", "--num_epochs", "60"]
    run = str(tmp_path / "run")
    main(flags + ["--run_dir", run])
    log = [json.loads(line) for line in open(os.path.join(run, "logs", "train.log"))]
    out = capsys.readouterr().out
    start, decay = 2, 2
    assert f"validation plateau at epoch {start}: the learning rate decays to 0 over {decay} epochs" in out
    assert len(log) == start + decay and "valid" in log[-1]  # stopped, validated, when the decay ended
    ckpt = torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)
    assert (ckpt["decay_from"], ckpt["decay_epochs"]) == (start, decay)
    train = parse_args(flags).train
    steps = log[0]["step"]
    lr = lambda step, decay_epochs=decay: learning_rate(train, LoopState(step=step, decay_from=start,  # noqa: E731
                                                                        decay_epochs=decay_epochs), steps)
    assert lr(start * steps + 5, decay_epochs=0) == 0.05  # before the plateau: --lr
    assert lr(start * steps) == pytest.approx(0.05)
    assert lr(start * steps + decay * steps // 2) == pytest.approx(0.025, rel=0.1)
    assert lr((start + decay) * steps) == pytest.approx(0.0, abs=1e-12)


def test_gpu_and_multiprocess_flags_on_one_cpu_process_do_nothing_and_say_so(tmp_path, capsys):
    runs = []
    for extra in ([], ["--compile", "--gather_negatives"]):  # --amp: tests/test_amp.py
        run = str(tmp_path / f"run{len(runs)}")
        main(TINY + ["--use_infonce", "--num_epochs", "1", "--run_dir", run] + extra)
        runs.append(torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)["model"])
    out = capsys.readouterr().out
    assert "--compile acts on CUDA only" in out and "--gather_negatives acts on" in out
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)


def test_resuming_a_mid_epoch_checkpoint_needs_the_same_process_count(capsys):
    from training.loop import LoopState, train_epoch
    with pytest.raises(SystemExit) as e:
        exits(train_epoch)(None, None, None, parse_args(TINY), torch.device("cpu"), LoopState(batch=3, world=2), None,
                           None)
    assert e.value.code == 2 and "interrupted mid-epoch with 2 process(es)" in capsys.readouterr().err


def test_compile_failure_on_the_first_call_falls_back_to_eager(capsys):
    from dataset import Batch
    from model import ItemTower
    from objectives.losses import LossOutput
    from training.loop import TrainStep

    class Model(torch.nn.Module):
        target_tower = ItemTower(3, 1)  # no item dropout: its step context does nothing

        def encode(self, batch):
            return batch.inputs.float()[..., None]

    class Loss(torch.nn.Module):
        def forward(self, states, pos_ids, tower, negatives, with_logits=False, weights=None):
            return LossOutput(states.sum())

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    step = TrainStep(Model(), Loss(), None)
    step.compiled = broken
    batch = Batch(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long), torch.arange(2), torch.arange(6))
    assert step(batch).loss.item() == 6.0
    assert "--compile failed (RuntimeError: no C++ compiler)" in capsys.readouterr().out and step.compiled is None


FAULTS_SCRIPT = """
import resource, sys, torch
from training import run
applied = run.keep_freed_memory() if sys.argv[1] == "on" else None
widths = torch.randint(2, 51, (40,), generator=torch.Generator().manual_seed(0)).tolist()
def step(w):  # a CPU step's activations: sizes follow the batch's width; all freed when the step ends
    return [torch.ones(128 * w * 50 * (1 + i % 3)) for i in range(10)]
for w in widths[:5]:
    step(w)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touched = sum(t.numel() * 4 // 4096 for w in widths[5:] for t in step(w))
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, touched)
"""


def test_keep_freed_memory_lets_later_steps_reuse_pages_without_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, "on"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    applied, faults, pages = out[0], int(out[1]), int(out[2])
    if applied != "True":
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    # measured: 190-1,000 faults over these 97,000 touched pages; ~39,000 with glibc's default thresholds
    assert faults < pages / 20


def test_min_delta_counts_only_real_progress_but_best_follows_every_gain(tmp_path, monkeypatch):
    from training import loop
    from training.loop import NullWriter, validate
    scores = iter([0.100, 0.1005, 0.1008])
    monkeypatch.setattr(loop, "run_evaluation", lambda *args, **kwargs: {"NDCG@10": next(scores)})
    saved = []
    for min_delta, stops in ((0.01, [False, False, True]), (0.0, [False, False, False])):
        scores = iter([0.100, 0.1005, 0.1008])
        config = parse_args(["--patience", "2", "--min_delta", str(min_delta), "--ckpt_dir", str(tmp_path)])
        state = LoopState()
        got = []
        for epoch in (1, 2, 3):
            state.epoch = epoch
            got.append(validate(None, None, config, None, state, NullWriter(), saved.append)[1])
        assert got == stops and state.best_epoch == 3 and state.best_ndcg == 0.1008  # best.pt: every gain


def test_plateau_waits_for_min_steps(tmp_path, monkeypatch):
    """A plateau before --min_steps optimizer steps starts no decay; the first one after does."""
    from training import loop
    from training.loop import NullWriter, validate
    monkeypatch.setattr(loop, "run_evaluation", lambda *args, **kwargs: {"NDCG@10": 0.1})
    config = parse_args(["--lr_schedule", "plateau", "--patience", "1", "--min_steps", "100", "--eval_every", "1",
                         "--ckpt_dir", str(tmp_path)])
    state = LoopState()
    for epoch, step, decay_from in ((1, 40, 0), (2, 80, 0), (3, 120, 3), (4, 160, 3)):
        state.epoch, state.step = epoch, step
        assert validate(None, None, config, None, state, NullWriter(), lambda path: None)[1] is False
        assert state.decay_from == decay_from
    assert state.decay_epochs == max(1, round(0.5 * 3))


@pytest.mark.parametrize("bucket, widths_vary", [("32", True), ("1", False)])
def test_bucket_batches_reaches_training(tmp_path, monkeypatch, bucket, widths_vary):
    """--bucket_batches 1 trains on random batches, each as wide as maxlen; the default trims by length."""
    from training import loop
    widths = []
    real_make_batch = loop.TrainBatches.make_batch
    monkeypatch.setattr(loop.TrainBatches, "make_batch",
                        lambda self, users, rng: widths.append(int(self.seq_lengths[users].max())) or
                        real_make_batch(self, users, rng))
    main(TINY + ["--batch_size", "64", "--num_epochs", "1", "--bucket_batches", bucket, "--run_dir",
                 str(tmp_path / "run")])
    assert widths and (len(set(widths)) > 1) == widths_vary and (widths_vary or widths[0] == 10)
