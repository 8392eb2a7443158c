"""Config values are checked by type: a config file's keys and a checkpoint's saved config.json."""
import json
import os

import pytest

from cli import exits
from config import build_config
from conftest import write

parse_args = exits(build_config)  # as main() runs it: one line on stderr and exit status 2


def usage_error(capsys, argv):
    """The one stderr line of a UsageError (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("text, expected", [
    ("lr = true\n", "key 'lr' expects a number (float), got true"),
    ("num_epochs = true\n", "key 'num_epochs' expects int (a whole number), got true"),
    ("hidden_units = 32.7\n", "key 'hidden_units' expects int (a whole number), got 32.7"),
    ("hidden_units = 32.0\n", "key 'hidden_units' expects int (a whole number), got 32.0"),
    ("lr = [0.1, 0.2]\n", "key 'lr' expects a number (float), got [0.1, 0.2]"),
    ('lr = "0.01"\n', "key 'lr' expects a number (float), got \"0.01\""),
    ('batch_size = "128"\n', "key 'batch_size' expects int (a whole number), got \"128\""),
    ("norm_first = 1\n", "key 'norm_first' expects true or false (bool), got 1"),
    ('keep_history = "yes"\n', "key 'keep_history' expects true or false (bool), got \"yes\""),
    ("use_infonce = 1\n", "key 'use_infonce' expects true or false (bool), got 1"),
    ("device = 0\n", "key 'device' expects a string (str), got 0"),
    ("lr = { value = 0.1 }\n", "key 'lr' expects a number (float), got {\"value\": 0.1}"),
    ("positive_actions = [1, 1.5]\n", "key 'positive_actions' expects a list of int (whole numbers), got [1, 1.5]"),
    ('eval_actions = [1, "2"]\n', "key 'eval_actions' expects a list of int (whole numbers), got [1, \"2\"]"),
    ("positive_actions = [true]\n", "key 'positive_actions' expects a list of int (whole numbers), got [true]"),
    ("mm_emb_id = [81.0]\n", "key 'mm_emb_id' expects a list of strings (str), got [81.0]"),
    ("item_features = [[\"a.json\"]]\n",
     "key 'item_features' expects a list of strings (str), got [[\"a.json\"]]"),
    ("[infonce]\ntemperature = false\n", "key [infonce] 'temperature' expects a number (float), got false"),
    ('amp = "fp16"\n', "key 'amp' expects one of ['none', 'bf16'], got \"fp16\""),
    ('augmentations = ["crop", "shuffle"]\n',
     "key 'augmentations' expects a list of ['crop', 'mask', 'reorder'], got [\"crop\", \"shuffle\"]"),
])
def test_a_config_value_of_the_wrong_type_names_file_and_key(tmp_path, capsys, text, expected):
    cfg = write(tmp_path, "c.toml", text)
    assert usage_error(capsys, ["--config", cfg]) == f"error: --config {cfg}: {expected}"


def test_values_of_the_right_type_are_read_as_before(tmp_path):
    cfg = write(tmp_path, "c.toml", 'lr = 1\ntemperature = 0.05\nhidden_units = 32\nnorm_first = false\n'
                'positive_actions = 2\neval_actions = [1, 2]\nmm_emb_id = [81, "82"]\nitem_feature_ids = []\n'
                'augmentations = "crop"\ndevice = "cpu"\n')
    c = build_config(["--config", cfg])
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)  # an int is fine where a float is expected
    assert (c.loss.temperature, c.model.hidden_units, c.model.norm_first, c.train.device) == (0.05, 32, False, "cpu")
    # a scalar where a list belongs is a one-element list; ids may be written as integers
    assert (c.loss.positive_actions, c.eval.eval_actions, c.data.mm_emb_id) == ((2,), (1, 2), ("81", "82"))
    assert (c.data.item_feature_ids, c.loss.augmentations) == ((), ("crop",))


def test_the_command_line_still_overrides_a_well_typed_file(tmp_path):
    cfg = write(tmp_path, "c.toml", "lr = 0.5\nnum_epochs = 3\n")
    c = build_config(["--config", cfg, "--lr", "0.25"])
    assert (c.train.lr, c.train.num_epochs) == (0.25, 3)


def saved_run(tmp_path, **changes):
    """A checkpoint folder whose config.json is a real run's flat config with `changes` written over it."""
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    flat = build_config(["--run_dir", str(tmp_path / "run"), "--ckpt_dir", str(ckpt)]).flat()
    flat.update(changes)
    (ckpt / "config.json").write_text(json.dumps(flat))
    return str(ckpt)


def test_an_untampered_saved_config_resumes_with_its_values(tmp_path):
    ckpt = saved_run(tmp_path, lr=0.003, hidden_units=24, num_heads=2, positive_actions=[1, 2],
                     mm_emb_id=["81"], state_dict_path=None)
    c = build_config(["--state_dict_path", ckpt])
    assert (c.train.lr, c.model.hidden_units, c.loss.positive_actions, c.data.mm_emb_id) == (0.003, 24, (1, 2),
                                                                                          ("81",))


@pytest.mark.parametrize("changes, expected", [
    ({"lr": True}, "key 'lr' expects a number (float), got true"),
    ({"num_epochs": 2.5}, "key 'num_epochs' expects int (a whole number), got 2.5"),
    ({"hidden_units": "64"}, "key 'hidden_units' expects int (a whole number), got \"64\""),
    ({"norm_first": 0}, "key 'norm_first' expects true or false (bool), got 0"),
    ({"positive_actions": [1, True]}, "key 'positive_actions' expects a list of int (whole numbers), got [1, true]"),
    ({"ckpt_dir": 7}, "key 'ckpt_dir' expects a string (str), got 7"),
    ({"batch_size": None}, "key 'batch_size' expects int (a whole number), got null"),
    ({"loss": "hinge"}, ("key 'loss' expects one of ['bce', 'gbce', 'infonce', 'sampled_softmax', 'ce'], "
                         "got \"hinge\"")),
])
def test_a_tampered_saved_config_names_the_file_and_key(tmp_path, capsys, changes, expected):
    ckpt = saved_run(tmp_path, **changes)
    path = os.path.join(ckpt, "config.json")
    assert usage_error(capsys, ["--state_dict_path", ckpt]) == f"error: --state_dict_path: {path}: {expected}"


def test_saved_nulls_stay_where_a_field_may_be_none(tmp_path):
    ckpt = saved_run(tmp_path, data_format=None, positive_actions=None, item_feature_ids=None)
    c = build_config(["--state_dict_path", ckpt])
    assert (c.data.data_format, c.loss.positive_actions, c.data.item_feature_ids) == (None, None, None)
