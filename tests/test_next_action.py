"""--next_action: each position is told the action type of the event it predicts, never that event's item;
evaluation and inference ask for --predict_action."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

import taac_synthetic
from config import ModelConfig
from dataset import Interactions, LeaveOneOut, TrainBatches, history_batch
from eval.competition import main as competition_main
from eval.competition import read_bin
from main import main as train_main
from model import SASRec
from training import checkpoint


def tiny_log():
    """Two users: items 1 2 3 4 5 with actions 0 1 2 0 1, and items 2 3 4 with actions 1 1 0."""
    return Interactions(offsets=np.array([0, 5, 8]), items=np.array([1, 2, 3, 4, 5, 2, 3, 4], np.int32),
                        user_ids=np.array(["a", "b"]), item_ids=np.array(["i1", "i2", "i3", "i4", "i5"]),
                        actions=np.array([0, 1, 2, 0, 1, 1, 1, 0], np.int8))


def test_each_position_gets_its_targets_action_and_the_last_the_asked_one():
    data = tiny_log()
    # user a's first 4 events (its 5th is the held-out target), user b's first 2, width 5 (left-padded)
    batch = history_batch(data, np.array([0, 1]), np.array([4, 7]), np.array([4, 2]), 5, predict_action=2)
    # action + 1 of the next event; the last position's next event is the target: asked for 2 (+1), not read
    assert batch.next_actions.tolist() == [[0, 2, 3, 1, 3], [0, 0, 0, 2, 3]]
    assert batch.actions.tolist() == [[0, 1, 2, 3, 1], [0, 0, 0, 2, 2]]
    data.actions[4], data.actions[7] = 2, 2  # the targets' own actions change: nothing the batch holds does
    again = history_batch(data, np.array([0, 1]), np.array([4, 7]), np.array([4, 2]), 5, predict_action=2)
    assert torch.equal(again.next_actions, batch.next_actions)


def test_training_positions_see_their_targets_action():
    data = tiny_log()
    split = LeaveOneOut(data)
    batch = TrainBatches(split, maxlen=5, batch_size=2).make_batch(np.array([0]), np.random.default_rng(0))
    # user a trains on events 0..2 (3 and 4 are validation and test): inputs 1 2, targets 2 3
    assert batch.inputs.tolist() == [[1, 2]] and batch.positives.tolist() == [[2, 3]]
    assert batch.next_actions.tolist() == [[2, 3]]  # the actions of events 1 and 2, + 1


def small_model(next_action=True):
    torch.manual_seed(0)
    config = ModelConfig(maxlen=5, hidden_units=8, num_blocks=1, num_heads=1, dropout_rate=0.0, num_items=5,
                         num_actions=3, next_action=next_action)
    return SASRec(config).eval()


def test_the_state_depends_on_the_next_action_never_on_the_target_item():
    model = small_model()
    batch = history_batch(tiny_log(), np.array([0]), np.array([4]), np.array([4]), 5, predict_action=1)
    states = model.encode(batch)
    batch.positives = torch.tensor([[0, 5, 5, 5, 5]])  # what the positions predict: never an input
    torch.testing.assert_close(model.encode(batch), states, rtol=0, atol=0)
    batch.next_actions[0, -1] = 3  # ask the last position for a conversion instead of a click
    changed = model.encode(batch)
    torch.testing.assert_close(changed[:, :-1], states[:, :-1], rtol=0, atol=0)  # causal: earlier states stay
    assert not torch.allclose(changed[:, -1], states[:, -1])
    assert small_model(next_action=False).context.next_action_emb is None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("next_action")
    train, predict, truth = taac_synthetic.split_predict(taac_synthetic.generate(300, 200, seed=5), 30)
    taac_synthetic.write_jsonl_layout(str(base / "train"), train)
    taac_synthetic.write_jsonl_predict(str(base / "eval"), train, predict)
    with open(base / "eval" / "truth.json", "w") as f:
        json.dump(truth, f)
    return base


BASE = ["--device", "cpu", "--maxlen", "20", "--hidden_units", "16", "--num_blocks", "1", "--cache_dir", "",
        "--use_infonce", "--positive_actions", "1", "2", "--next_action"]


def quiet(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        fn(argv)


def test_next_action_resumes_exactly_and_inference_asks_for_the_chosen_action(folders, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for run, epochs in ((straight, "2"), (split, "1")):
        quiet(train_main, BASE + ["--data", str(folders / "train"), "--num_epochs", epochs, "--run_dir", run])
    quiet(train_main, ["--num_epochs", "2", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert any("next_action_emb" in k for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    queries = {}
    for action in (1, 2):
        out = str(tmp_path / f"out{action}")
        quiet(competition_main, ["--ckpt", os.path.join(straight, "ckpt"), "--eval_data", str(folders / "eval"),
                                 "--out", out, "--predict_action", str(action)])
        queries[action] = read_bin(os.path.join(out, "query.fbin"), np.float32)
    assert np.isfinite(queries[1]).all() and not np.allclose(queries[1], queries[2])
    default_out = str(tmp_path / "default")
    quiet(competition_main, ["--ckpt", os.path.join(straight, "ckpt"), "--eval_data", str(folders / "eval"),
                             "--out", default_out])  # the saved --predict_action: 1
    np.testing.assert_array_equal(read_bin(os.path.join(default_out, "query.fbin"), np.float32), queries[1])
    model = SASRec.from_checkpoint(checkpoint.load(os.path.join(straight, "ckpt", "best.pt")))
    assert model.context.next_action_emb.num_embeddings == 4  # actions 0, 1, 2 and padding
    refused = str(tmp_path / "refused")
    with pytest.raises(SystemExit) as exit_:  # refused before any output folder exists
        competition_main(["--ckpt", os.path.join(straight, "ckpt"), "--eval_data", str(folders / "eval"), "--out",
                          refused, "--predict_action", "3"])
    assert exit_.value.code == 2 and not os.path.exists(refused)


def test_next_action_is_refused_without_action_types_and_an_unknown_asked_action(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", "synthetic", "--next_action", "--run_dir", str(tmp_path / "r")])
    assert exit_.value.code == 2 and not (tmp_path / "r").exists()
    assert capsys.readouterr().err.strip() == ("error: --next_action: synthetic has no action types (a competition "
                                               "folder, or --action_col)")
    with pytest.raises(SystemExit) as exit_:
        train_main(BASE + ["--data", str(folders / "train"), "--predict_action", "3", "--run_dir",
                           str(tmp_path / "r")])
    assert exit_.value.code == 2 and not (tmp_path / "r").exists()
    assert "--predict_action 3: " in capsys.readouterr().err
