"""--action_col / --action_threshold: a delimited log's action types, aligned with its items through the
reader's sort by user and time, errors naming file and line, the cache keyed on both flags, and a run on
MovieLens-100K with ratings >= 4 as clicks."""
import json
import os

import numpy as np
import pytest

from cli import UsageError
from config import build_config
from conftest import shared_file, write
from dataset import DataError
from main import main
from readers.logs import load_interactions

# Events out of time order in the file, users interleaved: the reader sorts each user's events by time.
LOG = ("user_id,item_id,timestamp,act\n"
       "u2,b,30,2\n"
       "u1,c,20,0\n"
       "u1,a,10,1\n"
       "u2,a,10,0\n"
       "u1,b,30,2\n"
       "u2,c,20,1\n")


def test_integer_action_column_stays_aligned_with_items_after_sorting(tmp_path):
    data = load_interactions(write(tmp_path, "log.csv", LOG), action_col="act")
    # u1: a@10 (1), c@20 (0), b@30 (2); u2: a@10 (0), c@20 (1), b@30 (2); items a, b, c are 1, 2, 3
    assert data.user_ids.tolist() == ["u1", "u2"] and data.item_ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(data.offsets, [0, 3, 6])
    np.testing.assert_array_equal(data.items, [1, 3, 2, 1, 3, 2])
    np.testing.assert_array_equal(data.times, [10, 20, 30, 10, 20, 30])
    np.testing.assert_array_equal(data.actions, [1, 0, 2, 0, 1, 2])
    assert data.actions.dtype == np.int8
    assert load_interactions(write(tmp_path, "same.csv", LOG)).actions is None  # never detected


def test_threshold_splits_a_numeric_column_into_clicks_and_exposures(tmp_path):
    log = write(tmp_path, "r.tsv", "user\titem\trating\n1\t1\t4.5\n1\t2\t3.99\n1\t3\t4\n1\t4\t-1\n1\t5\t1e1\n")
    data = load_interactions(log, action_col="rating", action_threshold=4)
    np.testing.assert_array_equal(data.actions, [1, 0, 1, 0, 1])  # file order: no time column
    exact = load_interactions(log, action_col="rating", action_threshold=4.5)
    np.testing.assert_array_equal(exact.actions, [1, 0, 0, 0, 1])


@pytest.mark.parametrize("cell, threshold", [("1.5", None), ("128", None), ("-1", None), ("nan", None),
                                             ("click", None), ("nan", 4.0), ("inf", 4.0), ("x", 4.0)])
def test_a_bad_action_cell_is_one_line_naming_file_and_line(tmp_path, cell, threshold):
    log = write(tmp_path, "log.csv", f"user_id,item_id,act\n1,1,0\n1,2,1\n\n2,1,{cell}\n")
    with pytest.raises(DataError) as e:
        load_interactions(log, action_col="act", action_threshold=threshold)
    message = str(e.value)
    assert message.startswith(f"{log}:5: column 'act' expected ") and repr(cell) in message
    assert "\n" not in message


def test_a_missing_action_column_lists_the_header(tmp_path):
    log = write(tmp_path, "log.csv", "user_id,item_id,ts\n1,1,1\n")
    with pytest.raises(DataError, match=r"no column named 'action' for the action; header has "
                                        r"\['user_id', 'item_id', 'ts'\]"):
        load_interactions(log, action_col="action")


def test_action_flags_are_checked_and_only_for_delimited_logs(tmp_path):
    with pytest.raises(UsageError, match="--action_threshold .* --action_col"):
        build_config(["--action_threshold", "4"])
    assert build_config(["--action_col", "rating", "--action_threshold", "4"]).data.action_threshold == 4.0
    with pytest.raises(DataError, match="--action_col act is for delimited logs"):
        load_interactions(write(tmp_path, "pairs.txt", "1 1\n1 2\n"), action_col="act")


def test_cache_keeps_actions_and_keys_on_the_action_flags(tmp_path):
    log, cache = write(tmp_path, "log.csv", LOG), str(tmp_path / "cache")
    first = load_interactions(log, cache_dir=cache, action_col="act")
    again = load_interactions(log, cache_dir=cache, action_col="act")
    assert isinstance(again.actions, np.memmap) and len(os.listdir(cache)) == 1  # served from the cache
    np.testing.assert_array_equal(again.actions, first.actions)
    assert again.fingerprint == first.fingerprint
    low = load_interactions(log, cache_dir=cache, action_col="act", action_threshold=1)
    high = load_interactions(log, cache_dir=cache, action_col="act", action_threshold=2)
    np.testing.assert_array_equal(low.actions, [1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(high.actions, [0, 0, 1, 0, 0, 1])  # not the threshold-1 cache
    none = load_interactions(log, cache_dir=cache)
    assert none.actions is None and len(os.listdir(cache)) == 4
    assert len({first.fingerprint, low.fingerprint, high.fingerprint, none.fingerprint}) == 4


def test_movielens_ratings_of_4_and_5_are_clicks_end_to_end(tmp_path, capsys):
    path = shared_file("ml-100k.inter")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    rating = header.index("rating:float")
    liked = {(r[0], r[1]) for r in rows if float(r[rating]) >= 4}
    data = load_interactions(path, action_col="rating", action_threshold=4)
    assert int((data.actions == 1).sum()) == len(liked) and len(data.actions) == len(rows)
    users = np.repeat(data.user_ids, data.lengths)  # each event's (user, item) pair is unique in ml-100k
    clicked = {(u, i) for u, i, a in zip(users, data.item_ids[data.items - 1], data.actions, strict=True) if a == 1}
    assert clicked == liked
    run = str(tmp_path / "run")
    main(["--data", path, "--action_col", "rating", "--action_threshold", "4", "--positive_actions", "1",
          "--eval_actions", "1", "--num_epochs", "1", "--device", "cpu", "--maxlen", "20", "--hidden_units", "16",
          "--num_blocks", "1", "--batch_size", "256", "--attn_bias", "position,time", "--time_features",
          "--run_dir", run, "--cache_dir", ""])
    assert "valid HR@10" in capsys.readouterr().out
    results = json.load(open(os.path.join(run, "results.json")))
    assert 0 < results["test"]["users"] < data.num_users  # only users whose test target is a click
