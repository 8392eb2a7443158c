"""Bad input, interruptions and checkpoint safety: every failure is one clear line, exit 2, nothing damaged."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from config import ModelConfig
from conftest import ROOT, TINY, fails_with, snapshot, write
from eval import infer
from main import main
from model import SASRec


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run whose files must survive every bad invocation below."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    main(TINY + ["--num_epochs", "1", "--run_dir", run_dir])
    return run_dir


# ----------------------------------------------------------------------------- bad data files

BAD_LOGS = [
    ("empty", "", [], "log.txt: file is empty"),
    ("non-integer item, lines", "1 1 2 3\n2 4 x 5\n3 1 2 3\n", [], "log.txt:2: item id 'x' is not an integer"),
    ("non-integer user, pairs", "1 5\n1 6\n1 7\nu2 6\n3 5\n", [], "log.txt:4: user id 'u2' is not an integer"),
    ("forced integer ids", "a 1 2 3\n", ["--id_type", "int"], "log.txt:1: user id 'a' is not an integer"),
    ("missing field, lines", "1 1 2 3\n2\n", [], "log.txt:2: expected 'user item1 item2 ...', got '2'"),
    ("missing field, pairs", "1 5\n1 6\n\n1\n", [], "log.txt:4: missing field, expected 2 fields, 'user item'"),
    ("missing column value", "user_id,item_id\n1,5\n1,\n", [], "log.txt:3: missing field, expected values in"),
    ("no named columns", "who,what\n1,5\n", ["--data_format", "delimited"], "log.txt: header has no user column"),
    ("unknown column flag", "user_id,item_id\n1,5\n", ["--item_col", "sku"], "log.txt: no column named 'sku'"),
    ("mixed: pairs then a 3-field line", "".join(f"{u} {i}\n" for u in range(1, 700) for i in (1, 2, 3)) + "5 6 7\n",
     ["--data_format", "pairs"], "log.txt:2098: expected 2 fields, 'user item', saw 3 fields"),
    ("mixed: csv rows in a lines file", "1 1 2 3\n2,4,5,6\n", [], "log.txt:2: expected 'user item1 item2 ...'"),
    ("mixed: second header", "user_id\titem_id\n1\t5\n1\t6\nuser_id\titem_id\n", [],
     "log.txt:4: user id 'user_id' is not an integer"),
    ("user with one item", "1 1 2 3\n2 4\n3 1 2\n", [], "1 user(s) with a single interaction, e.g. user '2'"),
    ("not text", "\x00\xff\xfe binary", [], "log.txt:1: not a UTF-8 text file (byte 1: invalid start byte)"),
]


@pytest.mark.parametrize("text, flags, message", [b[1:] for b in BAD_LOGS], ids=[b[0] for b in BAD_LOGS])
def test_bad_data_file_is_one_line_exit_2(tmp_path, capsys, text, flags, message):
    path = tmp_path / "log.txt"
    path.write_bytes(text.encode("latin-1"))
    fails_with(capsys, main, ["--data", str(path), "--cache_dir", "", "--run_dir", str(tmp_path / "r")] + flags,
               message)
    assert not os.path.exists(tmp_path / "r")  # nothing written for a run that never started


def test_string_ids_and_ignored_single_item_users(tmp_path, capsys):
    lines = "".join(f"u{u} {u % 5 + 10} {u % 7 + 20} 8 {'007' if u == 3 else 7}\n" for u in range(40)) + "x 9\n"
    data, run = write(tmp_path, "log.txt", lines), str(tmp_path / "run")
    # auto: a column of integers with one '007' in it is suspect ('007' is not the integer 7)
    fails_with(capsys, main, ["--data", data, "--cache_dir", "", "--run_dir", run],
               "log.txt:4: item id '007' is not an integer")
    main(TINY[2:] + ["--data", data, "--id_type", "str", "--single_item_users", "ignore", "--num_epochs", "1",
                     "--run_dir", run])
    items = json.load(open(os.path.join(run, "ckpt", "id_map.json")))["items"]
    assert "007" in items and "7" in items and "9" in items  # strings as written; user x is kept, untrained


@pytest.mark.parametrize("flags, message", [(["--maxlen", "0"], "--maxlen must be >= 1"),
                                            (["--bucket_batches", "0"], "--bucket_batches must be >= 1"),
                                            (["--hidden_units", "10", "--num_heads", "3"], "divisible by --num_heads"),
                                            (["--num_heads", "0"], "--num_heads must be >= 1"),
                                            (["--temperature", "-1"], "--temperature must be > 0"),
                                            (["--infonce_temperature", "0"], "--temperature must be > 0"),
                                            (["--item_emb_dropout", "1"], "--item_emb_dropout must be in [0, 1)"),
                                            (["--item_emb_dropout", "0.2", "--output_emb", "separate"],
                                             "--item_emb_dropout drops the table that inputs and targets share"),
                                            (["--item_emb_dropout", "0.2", "--no_item_id"],
                                             "--item_emb_dropout drops the item id table"),
                                            (["--item_id_dropout", "1"], "--item_id_dropout must be in [0, 1)"),
                                            (["--item_id_dropout", "0.2"], "--item_id_dropout needs --item_features")])
def test_bad_shape_and_temperature_flags(capsys, flags, message):
    fails_with(capsys, main, TINY + flags, message)


# ----------------------------------------------------------------------------- checkpoints

def bad_checkpoints(run, tmp_path):
    """name -> a checkpoint directory that must be refused."""
    good = open(os.path.join(run, "ckpt", "best.pt"), "rb").read()
    dirs = {}
    saved = torch.load(os.path.join(run, "ckpt", "best.pt"), weights_only=True)
    other = io.BytesIO()  # the right format and config, but weights of another width (8, not 16)
    narrow = SASRec(ModelConfig(num_items=3000, maxlen=10, hidden_units=8, num_blocks=1))
    torch.save({**saved, "model": narrow.state_dict()}, other)
    old = io.BytesIO()  # what a checkpoint looked like before the format version (state-dict names have changed)
    torch.save({"model": {"item_emb.weight": torch.zeros(3001, 16)}, "objective": {}, "epoch": 1, "step": 16}, old)
    for name, content in (("truncated", good[:len(good) // 2]), ("not a checkpoint", b"hello\n"),
                          ("pickle payload", payload(tmp_path / "pwned")), ("another shape", other.getvalue()),
                          ("older format", old.getvalue())):
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        for f in ("config.json", "id_map.json"):
            (d / f).write_bytes(open(os.path.join(run, "ckpt", f), "rb").read())
        (d / "best.pt").write_bytes(content)
        (d / "last.pt").write_bytes(content)
        dirs[name] = str(d)
    return dirs


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this would create the marker file
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def payload(marker):
    buffer = io.BytesIO()
    torch.save({"model": Exploit(marker), "epoch": 1}, buffer)
    return buffer.getvalue()


def pickled_globals(checkpoint_bytes):
    """'module name' of every global the checkpoint's pickle would import and call, read from its bytes
    without unpickling: torch.save writes pickle protocol 2, where each is a GLOBAL opcode, b'c' followed
    by 'module\\nname\\n'."""
    with zipfile.ZipFile(io.BytesIO(checkpoint_bytes)) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {f"{m.decode()} {n.decode()}" for m, n in re.findall(rb"c([A-Za-z_][\w.]*)\n([A-Za-z_]\w*)\n", data)}


CKPT_ERRORS = {"truncated": "not a readable checkpoint", "not a checkpoint": "not a readable checkpoint",
               "pickle payload": "not a readable checkpoint", "another shape": "does not fit this model",
               "older format": "checkpoint format 1 predates this version's format 2"}
INFER_ERRORS = {**CKPT_ERRORS, "another shape": "not a loadable checkpoint for this config"}


@pytest.mark.parametrize("kind", list(CKPT_ERRORS))
def test_bad_checkpoint_is_refused_by_main_and_infer(run, tmp_path, capsys, kind):
    if kind == "pickle payload":  # the payload is live: unpickling it would call exec (read here, never run)
        assert {"__builtin__ exec", "builtins exec"} & pickled_globals(payload(tmp_path / "live"))
    before = snapshot(run)
    ckpt = bad_checkpoints(run, tmp_path)[kind]
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--inference_only", "--run_dir", str(tmp_path / "r")],
               f"--state_dict_path {ckpt}/best.pt: {CKPT_ERRORS[kind]}")
    fails_with(capsys, main, ["--state_dict_path", ckpt, "--run_dir", str(tmp_path / "r2")],
               f"--state_dict_path {ckpt}/last.pt: {CKPT_ERRORS[kind]}")
    fails_with(capsys, infer.main, ["--ckpt", ckpt, "--out", str(tmp_path / "o")], INFER_ERRORS[kind])
    assert not (tmp_path / "pwned").exists()  # weights_only=True: the pickled code never ran
    assert snapshot(run) == before


def test_missing_and_mismatched_checkpoints(run, tmp_path, capsys):
    before = snapshot(run)
    missing = str(tmp_path / "nowhere")
    fails_with(capsys, main, TINY + ["--state_dict_path", missing], f"--state_dict_path {missing}: no such checkpoint")
    fails_with(capsys, infer.main, ["--ckpt", missing], "missing config.json")
    ckpt = os.path.join(run, "ckpt")
    fails_with(capsys, main, ["--hidden_units", "32", "--state_dict_path", ckpt, "--inference_only"],
               "--hidden_units 32 contradicts the checkpoint's saved config (hidden_units = 16)")
    bare = tmp_path / "bare.pt"  # a checkpoint file without its config: the shape check happens on load
    bare.write_bytes(open(os.path.join(ckpt, "best.pt"), "rb").read())
    fails_with(capsys, main, TINY + ["--hidden_units", "32", "--state_dict_path", str(bare), "--inference_only",
                                     "--run_dir", str(tmp_path / "r")], "does not fit this model")
    # a new run into a folder that already holds one would overwrite its checkpoints
    fails_with(capsys, main, TINY + ["--num_epochs", "1", "--run_dir", run], "already holds a run")
    assert snapshot(run) == before


def test_a_moved_run_resumes_in_its_new_place(run, tmp_path):
    before = snapshot(run)
    moved = shutil.copytree(run, tmp_path / "moved")
    main(["--state_dict_path", os.path.join(moved, "ckpt"), "--num_epochs", "2"])
    assert torch.load(os.path.join(moved, "ckpt", "last.pt"), weights_only=True)["epoch"] == 2
    assert os.path.exists(os.path.join(moved, "results.json")) and snapshot(run) == before


def test_unwritable_outputs(run, tmp_path, capsys):
    blocker = write(tmp_path, "file", "")  # a path below a regular file can never be created (even as root)
    fails_with(capsys, main, TINY + ["--num_epochs", "1", "--run_dir", os.path.join(blocker, "run")],
               f"--run_dir {blocker}/run: not a writable folder")
    fails_with(capsys, infer.main, ["--ckpt", os.path.join(run, "ckpt"), "--out", os.path.join(blocker, "o")],
               f"--out {blocker}/o: not a writable folder")


def test_unknown_ids_at_inference(run, tmp_path, capsys):
    ckpt = os.path.join(run, "ckpt")
    queries = write(tmp_path, "q.txt", "alice 5 6 7\nbob 999999 12\n")
    fails_with(capsys, infer.main, ["--ckpt", ckpt, "--queries", queries, "--out", str(tmp_path / "o")],
               "q.txt: item '999999' (user 'bob') is not in the checkpoint's id map of 3000 items")
    cands = write(tmp_path, "c.txt", "5 6\n7 sku-9\n")
    fails_with(capsys, infer.main, ["--ckpt", ckpt, "--candidates", cands, "--out", str(tmp_path / "o")],
               "c.txt:2: item 'sku-9' is not in the checkpoint's id map")
    assert not os.path.exists(tmp_path / "o" / "topk.jsonl")


# ----------------------------------------------------------------------------- interruptions

CHILD = """
import os, signal, sys, time, io
sys.path.insert(0, {root!r})
import torch, main
from training import loop
mode, at = sys.argv[1], int(sys.argv[2])
calls = [0]
if mode == "sigint":  # Ctrl-C in the middle of an epoch, during the forward pass of step `at`
    forward = loop.TrainStep.eager
    def counting(self, *a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *a, **k)
    loop.TrainStep.eager = counting
else:  # the `at`-th checkpoint save stalls half-written until the parent kills us
    save = torch.save
    def stalling(obj, f):
        calls[0] += 1
        if calls[0] != at:
            return save(obj, f)
        buffer = io.BytesIO()
        save(obj, buffer)
        open(f, "wb").write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        print("SAVING", flush=True)
        time.sleep(120)
    torch.save = stalling
main.main(sys.argv[3:])
"""


def child(mode, at, argv, **kwargs):
    return subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT), mode, str(at), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def assert_same_training_state(a_path, b_path):
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert (a["epoch"], a["step"], a["batch"]) == (b["epoch"], b["step"], b["batch"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)


def test_sigint_mid_epoch_saves_and_resumes_at_the_same_step(tmp_path):
    flags = TINY + ["--dropout_rate", "0.3", "--eval_every", "2", "--num_epochs", "3"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    main(flags + ["--run_dir", straight])
    proc = child("sigint", 20, flags + ["--run_dir", stopped])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped at epoch 2, batch 4/16 (step 20); checkpoint saved" in out and "Traceback" not in err
    ckpt = torch.load(os.path.join(stopped, "ckpt", "last.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 4, 20)
    main(["--state_dict_path", os.path.join(stopped, "ckpt")])  # no other flag: the saved config has them
    assert_same_training_state(os.path.join(straight, "ckpt", "last.pt"), os.path.join(stopped, "ckpt", "last.pt"))
    assert_same_training_state(os.path.join(straight, "ckpt", "best.pt"), os.path.join(stopped, "ckpt", "best.pt"))


def test_kill_9_during_save_leaves_the_previous_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    flags = TINY + ["--eval_every", "10", "--num_epochs", "3", "--run_dir", run]
    proc = child("stall", 2, flags)  # save 1: epoch 1's last.pt; save 2: epoch 2's, killed half-written
    for line in proc.stdout:
        if line.strip() == "SAVING":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt_dir = os.path.join(run, "ckpt")
    leftovers = [f for f in os.listdir(ckpt_dir) if ".tmp" in f]
    assert leftovers == [f".last.pt.tmp{proc.pid}"]  # the kill did land mid-write
    assert torch.load(os.path.join(ckpt_dir, "last.pt"), weights_only=True)["epoch"] == 1
    main(["--state_dict_path", ckpt_dir])  # resumes from epoch 1 and cleans the dead process's temp file
    assert torch.load(os.path.join(ckpt_dir, "last.pt"), weights_only=True)["epoch"] == 3
    assert not [f for f in os.listdir(ckpt_dir) if ".tmp" in f]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    main(TINY + ["--num_epochs", "1", "--run_dir", run])
    checkpoints = ("best.pt", "last.pt")
    before = [open(os.path.join(run, "ckpt", f), "rb").read() for f in checkpoints]
    from training import loop
    forward = loop.TrainStep.eager
    calls = [0]

    def poisoned(self, *a, **k):  # the 3rd step of epoch 2 (global step 19) produces NaN
        calls[0] += 1
        out = forward(self, *a, **k)
        out.loss = out.loss * float("nan") if calls[0] == 3 else out.loss
        return out
    monkeypatch.setattr(loop.TrainStep, "eager", poisoned)
    capsys.readouterr()
    fails_with(capsys, main, ["--state_dict_path", os.path.join(run, "ckpt"), "--num_epochs", "2"],
               "non-finite loss (nan) at epoch 2, step 19; training stopped, checkpoints left as they were", code=1)
    assert [open(os.path.join(run, "ckpt", f), "rb").read() for f in checkpoints] == before
