"""A run owns its folder; a checkpoint knows its data; finished runs, runs without targets and full disks are
one line. Each case here was a silent wrong result or a lost run before."""
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import taac_synthetic
from config import ModelConfig
from conftest import ROOT, TINY, fails_with, snapshot, write
from eval import infer
from files import lock_folder, release_locks
from main import main
from model import SASRec
from readers import taac
from training import checkpoint

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two torch processes on 2 cores: no spin-waiting


def start(args):
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- a run owns its folder

def test_two_runs_started_at_once_into_one_folder_one_trains_the_other_is_refused(tmp_path):
    run = str(tmp_path / "run")
    procs = [start(TINY + ["--num_epochs", "2", "--run_dir", run, "--hidden_units", str(h)]) for h in (16, 32)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert refused.startswith("error: --") and "in use by another run (pid " in refused and refused.count("\n") == 1
    winner = 16 if outcomes[0][0] == 0 else 32
    saved = json.load(open(os.path.join(run, "ckpt", "config.json")))
    last = torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)
    results = json.load(open(os.path.join(run, "results.json")))
    assert saved["hidden_units"] == last["model_config"]["hidden_units"] == results["config"]["hidden_units"] == winner
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(run, "logs", "train.log"))]
    assert epochs == [1, 2]


def test_two_resumes_at_once_one_trains_the_other_is_refused(tmp_path):
    run = str(tmp_path / "run")
    main(TINY + ["--num_epochs", "1", "--run_dir", run])
    ckpt = os.path.join(run, "ckpt")
    procs = [start(["--state_dict_path", ckpt, "--num_epochs", "3", "--lr", lr]) for lr in ("0.002", "0.003")]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in outcomes) == [0, 2], outcomes
    assert "in use by another run (pid " in next(err for code, err in outcomes if code == 2)
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(run, "logs", "train.log"))]
    assert epochs == [1, 2, 3]  # each epoch once
    saved = json.load(open(os.path.join(ckpt, "config.json")))
    assert saved["lr"] == json.load(open(os.path.join(run, "results.json")))["config"]["lr"]


def test_a_held_lock_refuses_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "import files; files.lock_folder(sys.argv[2]); print('held', flush=True); "
                               "time.sleep(120)", ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        fails_with(capsys, main, TINY + ["--num_epochs", "1", "--run_dir", str(run)],
                   f"--run_dir {run}: in use by another run (pid {holder.pid})")
        assert snapshot(run) == before  # nothing written by the refused run
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    main(TINY + ["--num_epochs", "1", "--run_dir", str(run)])  # the stale lock file does not block
    assert os.path.exists(run / "results.json")


def test_locks_are_released_when_a_run_ends_in_process(tmp_path):
    lock_folder(str(tmp_path))
    release_locks()
    child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import files; "
                            "files.lock_folder(sys.argv[2])", ROOT, str(tmp_path)], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr


# ----------------------------------------------------------------------------- the data of a checkpoint

def user_lines(num_users=300, seed=0):
    rng = np.random.default_rng(seed)
    return [f"u{u} " + " ".join(f"i{i}" for i in rng.integers(0, 80, size=rng.integers(4, 12))) + "\n"
            for u in range(num_users)]


@pytest.fixture
def trained(tmp_path):
    """A 2-epoch run on a small string-id log, and that log."""
    lines = user_lines()
    data = write(tmp_path, "log.txt", "".join(lines))
    run = str(tmp_path / "run")
    main(["--data", data, "--device", "cpu", "--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1",
          "--num_epochs", "2", "--eval_every", "1", "--cache_dir", "", "--run_dir", run])
    return data, run, lines


def test_resume_and_inference_refuse_a_log_whose_items_changed_and_leave_the_run_as_it_was(trained, capsys):
    data, run, lines = trained
    ckpt = os.path.join(run, "ckpt")
    with open(data, "w") as f:  # one item label renamed: every later item index shifts
        f.write(re.sub(r"\bi7\b", "renamed", "".join(lines)))
    before = snapshot(run)
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--num_epochs", "4"],
               f"--data {data}: its item ids differ from the checkpoint's (80 items then, 80 now)")
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--inference_only"], "its item ids differ")
    fails_with(capsys, infer.main, ["--ckpt", ckpt, "--out", os.path.join(run, "infer")], "its item ids differ")
    assert snapshot(run) == before  # id_map.json byte-identical, nothing else written either


def test_a_log_whose_content_changed_is_refused_unless_asked_for(trained, capsys):
    data, run, lines = trained
    ckpt = os.path.join(run, "ckpt")
    first = lines[0].split()
    lines[0] = " ".join(first[:-1] + [first[1]]) + "\n"  # one event now another known item: same item ids
    with open(data, "w") as f:
        f.write("".join(lines))
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--num_epochs", "4"],
               "its content differs from the data the checkpoint was trained on (same item ids)")
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--inference_only"], "--allow_other_data")
    main(["--state_dict_path", ckpt, "--inference_only", "--allow_other_data"])
    fails_with(capsys, infer.main, ["--ckpt", ckpt, "--out", os.path.join(run, "infer")], "its content differs")
    infer.main(["--ckpt", ckpt, "--out", os.path.join(run, "infer"), "--allow_other_data"])
    assert os.path.exists(os.path.join(run, "infer", "metrics.json"))


def test_a_replaced_id_map_is_refused_at_inference(trained, capsys):
    _, run, _ = trained
    path = os.path.join(run, "ckpt", "id_map.json")
    id_map = json.load(open(path))
    id_map["items"][0], id_map["items"][1] = id_map["items"][1], id_map["items"][0]
    json.dump(id_map, open(path, "w"))
    fails_with(capsys, infer.main, ["--ckpt", os.path.join(run, "ckpt")], "not the item id map")


def test_finetune_on_changed_data_is_a_new_run_with_items_matched_by_raw_id(trained, tmp_path, capsys):
    data, run, lines = trained
    ckpt = os.path.join(run, "ckpt")
    original = snapshot(run)
    with open(data, "w") as f:
        f.write(re.sub(r"\bi7\b", "brand_new", "".join(lines)))
    new_run = str(tmp_path / "finetuned")
    main(["--state_dict_path", ckpt, "--finetune", "--num_epochs", "1", "--run_dir", new_run])
    assert "79 of 80 items matched by raw id, 1 new (untrained)" in capsys.readouterr().out
    assert snapshot(run) == original  # the original run, its id_map.json included, untouched
    new_items = json.load(open(os.path.join(new_run, "ckpt", "id_map.json")))["items"]
    assert "brand_new" in new_items and "i7" not in new_items
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--finetune", "--run_dir", run],
               "already holds a run")  # never into the checkpoint's own folder


def test_transfer_weights_copies_item_rows_by_raw_id():
    config = ModelConfig(num_items=3, maxlen=5, hidden_units=4, num_blocks=1)
    old = SASRec(config)
    new = SASRec(ModelConfig(num_items=4, maxlen=5, hidden_units=4, num_blocks=1))
    fresh_row = new.item_tower.id_emb.weight[3].clone()
    matched, fresh = checkpoint.transfer_weights(new, {"model": old.state_dict()}, ["a", "b", "c"],
                                                 ["c", "a", "z", "b"])
    table, old_table = new.item_tower.id_emb.weight, old.item_tower.id_emb.weight
    assert matched == 3 and fresh == []
    for new_row, old_row in ((1, 3), (2, 1), (4, 2)):  # c, a, b
        torch.testing.assert_close(table[new_row], old_table[old_row], rtol=0, atol=0)
    torch.testing.assert_close(table[3], fresh_row, rtol=0, atol=0)  # z keeps its initialisation
    torch.testing.assert_close(new.pos_emb.weight, old.pos_emb.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------- finished runs, full disks

def test_resuming_a_finished_run_is_refused_and_rewrites_nothing(tmp_path, capsys):
    run = str(tmp_path / "run")
    main(TINY + ["--num_epochs", "1", "--run_dir", run])
    before = snapshot(run)
    fails_with(capsys, main, ["--state_dict_path", os.path.join(run, "ckpt")],
               "the run is finished (trained its --num_epochs 1): nothing to resume")
    assert snapshot(run) == before  # results.json keeps its train_minutes
    main(["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2"])  # more epochs: it trains on
    assert torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)["epoch"] == 2


def test_an_early_stopped_run_is_not_resumed(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setattr("training.loop.run_evaluation", lambda *a, **k: {"NDCG@10": 0.1, "HR@10": 0.2})
    main(TINY + ["--num_epochs", "10", "--eval_every", "1", "--patience", "1", "--run_dir", run])
    assert torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)["finished"] == "early_stop"
    fails_with(capsys, main, ["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "20"],
               "the run is finished (stopped early at epoch 2)")


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos "
                                                  "4096 vs 2048"), OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch,
                                                                                     failure):
    run = str(tmp_path / "run")
    main(TINY + ["--num_epochs", "1", "--run_dir", run])
    before = snapshot(os.path.join(run, "ckpt"))

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise failure
    monkeypatch.setattr(torch, "save", full_disk)
    fails_with(capsys, main, ["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2"],
               f"cannot write the checkpoint {os.path.abspath(os.path.join(run, 'ckpt'))}", code=1)
    after = snapshot(os.path.join(run, "ckpt"))
    assert (after["best.pt"], after["last.pt"]) == (before["best.pt"], before["last.pt"])  # as they were
    assert sorted(after) == sorted(before)  # no temporary file left
    monkeypatch.undo()
    main(["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2"])  # once there is room, it resumes


# ----------------------------------------------------------------------------- batches without targets

@pytest.fixture(scope="module")
def competition_log():
    return taac_synthetic.generate(60, 40, seed=5)


def taac_folder(log, path, exposure_only_users):
    log = dataclasses.replace(log, actions=log.actions.copy())  # the module's log stays as generated
    for u in exposure_only_users:
        log.actions[log.offsets[u]:log.offsets[u + 1]] = 0
    taac_synthetic.write_jsonl_layout(str(path), log)
    return str(path)


TAAC = ["--config", os.path.join(ROOT, "configs", "taac.toml"), "--device", "cpu", "--hidden_units", "16",
        "--num_epochs", "1", "--cache_dir", ""]


def test_users_without_a_target_are_left_out_and_counted(competition_log, tmp_path, capsys):
    folder = taac_folder(competition_log, tmp_path / "train", exposure_only_users=[0, 1])
    run = str(tmp_path / "run")
    main(TAAC + ["--data", folder, "--batch_size", "1", "--run_dir", run])
    assert "2 users have no training target" in capsys.readouterr().out
    record = json.loads(open(os.path.join(run, "logs", "train.log")).readline())
    assert record["users_without_target"] == 2


def test_a_log_without_any_target_is_one_line_before_anything_is_written(competition_log, tmp_path, capsys):
    folder = taac_folder(competition_log, tmp_path / "train", exposure_only_users=range(60))
    run = tmp_path / "run"
    fails_with(capsys, main, TAAC + ["--data", folder, "--run_dir", str(run)], "no training target")
    assert not run.exists()


def test_the_folder_fingerprint_covers_only_the_files_read(competition_log, tmp_path, capsys):
    folder = taac_folder(competition_log, tmp_path / "train", exposure_only_users=[])
    run = str(tmp_path / "run")
    cache = str(tmp_path / "train" / ".cache")  # a cache kept inside the folder
    main(TAAC + ["--data", folder, "--mm_emb_id", "81", "--run_dir", run, "--cache_dir", cache])
    digest = taac.folder_digest(folder, ["81"])
    (tmp_path / "train" / "README.txt").write_text("notes")  # files the reader never opens
    os.makedirs(tmp_path / "train" / "creative_emb" / "emb_82_1024")
    (tmp_path / "train" / "creative_emb" / "emb_82_1024" / "part-0.json").write_text("{}\n")
    assert taac.folder_digest(folder, ["81"]) == digest
    main(["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2"])  # resumes: the data read is the same
    with open(os.path.join(folder, "seq.jsonl"), "a") as f:  # a file it reads: another fingerprint
        f.write("\n")
    assert taac.folder_digest(folder, ["81"]) != digest


def test_finetune_leaves_feature_tables_untrained_where_codes_mean_other_values():
    spec = {"features": [{"name": "100", "vocab_size": 6, "width": 1}], "vectors": []}
    config = ModelConfig(num_items=3, maxlen=5, hidden_units=4, num_blocks=1, item_side=spec)
    old, new = SASRec(config), SASRec(config)
    initial = new.item_tower.feature_emb[0].weight.clone()
    _, fresh = checkpoint.transfer_weights(new, {"model": old.state_dict()}, ["a", "b", "c"], ["a", "b", "c"],
                                           same_feature_codes=False)
    assert fresh == ["item_tower.feature_emb.0.weight"]
    torch.testing.assert_close(new.item_tower.feature_emb[0].weight, initial, rtol=0, atol=0)
    torch.testing.assert_close(new.item_tower.id_emb.weight, old.item_tower.id_emb.weight, rtol=0, atol=0)
    checkpoint.transfer_weights(new, {"model": old.state_dict()}, ["a", "b", "c"], ["a", "b", "c"])
    torch.testing.assert_close(new.item_tower.feature_emb[0].weight, old.item_tower.feature_emb[0].weight)
