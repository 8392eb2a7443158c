import os
import time

import numpy as np
import pytest

from conftest import shared_file, write
from dataset import DataError, LeaveOneOut, TrainBatches, left_padded
from objectives.samplers import NegativeSampler
from readers.logs import detect_format, load_interactions, make_synthetic


def sequences(data):
    """{raw user: [raw items]} for readable assertions."""
    return {u: [data.item_ids[i - 1] for i in data.items[data.offsets[k]:data.offsets[k + 1]]]
            for k, u in enumerate(data.user_ids)}


def test_lines_reader_keeps_order_and_reindexes_string_ids(tmp_path):
    path = write(tmp_path, "log.txt", "alice b a c\n\nbob c d\n")
    data = load_interactions(path)
    assert detect_format(path) == "lines"
    assert sequences(data) == {"alice": ["b", "a", "c"], "bob": ["c", "d"]}
    assert data.item_ids.tolist() == ["a", "b", "c", "d"]  # items 1..4, 0 is padding
    assert data.items.tolist() == [2, 1, 3, 3, 4]


def test_integer_ids_are_ordered_numerically(tmp_path):
    data = load_interactions(write(tmp_path, "log.txt", "2 10 9\n1 1 10\n"))
    assert data.user_ids.tolist() == ["1", "2"]
    assert data.item_ids.tolist() == ["1", "9", "10"]
    assert sequences(data) == {"1": ["1", "10"], "2": ["10", "9"]}


def test_pairs_reader_groups_users_stably(tmp_path):
    path = write(tmp_path, "log.txt", "1 5\n2 7\n1 3\n2 5\n1 9\n")
    assert detect_format(path) == "pairs"
    assert sequences(load_interactions(path)) == {"1": ["5", "3", "9"], "2": ["7", "5"]}


def test_delimited_reader_sorts_by_timestamp_stably(tmp_path):
    path = write(tmp_path, "log.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "u1\tx\t5\t30\nu2\ty\t3\t10\nu1\ty\t4\t10\nu1\tz\t4\t10\nu2\tx\t1\t5\n")
    assert detect_format(path) == "delimited"
    assert sequences(load_interactions(path)) == {"u1": ["y", "z", "x"], "u2": ["x", "y"]}


def test_csv_with_named_columns_and_dates(tmp_path):
    path = write(tmp_path, "log.csv", "who,what,when\na,p,2024-01-02\na,q,2024-01-01\n")
    data = load_interactions(path, "delimited", user_col="who", item_col="what", time_col="when")
    assert sequences(data) == {"a": ["q", "p"]}


def test_delimited_without_user_column_names_the_file(tmp_path):
    path = write(tmp_path, "log.csv", "person,item_id\na,b\n")
    with pytest.raises(DataError, match="log.csv: header has no user column"):
        load_interactions(path, "delimited")


def test_cache_reload_is_identical(tmp_path):
    path = write(tmp_path, "log.txt", "1 1 2 3\n2 2 3\n")
    first = load_interactions(path, cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 1
    again = load_interactions(path, cache_dir=str(tmp_path / "cache"))
    for name in ("offsets", "items", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert isinstance(again.items, np.memmap) and not again.items.flags.writeable  # mapped, read-only
    with open(path, "a") as f:  # new content -> new key, never a stale cache
        f.write("3 1 2\n")
    assert load_interactions(path, cache_dir=str(tmp_path / "cache")).num_users == 3


def test_cached_split_arrays_match_computed_ones_and_a_damaged_cache_is_rebuilt(tmp_path, capsys):
    path = write(tmp_path, "log.txt", "1 5 3 4 1 2\n2 2 3\n3 4 4 1 5\n4 1\n")
    fresh = load_interactions(path, id_type="int")  # parsed, no cache: LeaveOneOut derives the arrays
    load_interactions(path, cache_dir=str(tmp_path / "cache"), id_type="int")
    cached = load_interactions(path, cache_dir=str(tmp_path / "cache"), id_type="int")
    a, b = LeaveOneOut(fresh), LeaveOneOut(cached)
    assert fresh.history is None and cached.history is not None
    np.testing.assert_array_equal(a.history, b.history)
    # user 1 (5 3 4 1 2) trains on 5 3 4, sorted; user 3 (4 4 1 5) on 4 4; users 2 and 4 (< 3 items) on all
    assert a.history.tolist() == [3, 4, 5, 1, 2, 2, 3, 4, 4, 1, 5, 1]
    for split in ("valid", "test"):
        np.testing.assert_array_equal(a.item_counts(split), b.item_counts(split))
    assert a.item_counts("valid").tolist() == [0, 1, 1, 2, 3, 1]
    assert a.item_counts("test").tolist() == [0, 3, 1, 2, 3, 1]
    users, items = np.array([0, 2]), np.array([[5, 1, 2], [4, 5, 1]])
    assert b.in_history(users, items).tolist() == [[True, False, False], [True, False, False]]
    folder = tmp_path / "cache" / os.listdir(tmp_path / "cache")[0]
    (folder / "history.npy").write_bytes(b"not an array")
    again = load_interactions(path, cache_dir=str(tmp_path / "cache"), id_type="int")
    assert "ignoring the damaged data cache" in capsys.readouterr().out
    np.testing.assert_array_equal(again.items, cached.items)
    assert isinstance(load_interactions(path, cache_dir=str(tmp_path / "cache"), id_type="int").items, np.memmap)


def test_beauty_reloads_from_cache_quickly(tmp_path):
    path = shared_file("Beauty.txt")
    cold = load_interactions(path, cache_dir=str(tmp_path))
    start = time.perf_counter()
    warm = load_interactions(path, cache_dir=str(tmp_path))
    LeaveOneOut(warm)
    assert time.perf_counter() - start < 1.0
    assert (warm.num_users, warm.num_items, len(warm.items)) == (22363, 12101, 198502)
    np.testing.assert_array_equal(cold.items, warm.items)


def test_leave_one_out_split(tmp_path):
    data = load_interactions(write(tmp_path, "log.txt", "1 1 2 3 4\n2 5 6\n3 7 8 9\n"))
    split = LeaveOneOut(data)
    assert split.num_short_users == 1
    assert split.train_lengths.tolist() == [2, 2, 1]
    users, ends, lengths, targets = split.eval_arrays("valid")
    assert users.tolist() == [0, 2] and targets.tolist() == [3, 8] and lengths.tolist() == [2, 1]
    users, ends, lengths, targets = split.eval_arrays("test")
    assert targets.tolist() == [4, 9] and lengths.tolist() == [3, 2]
    assert data.items[ends[0] - lengths[0]:ends[0]].tolist() == [1, 2, 3]
    # popularity for test counts training items plus validation targets, never test targets
    assert split.item_counts("test").tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 1, 0]


def test_left_padded():
    items = np.array([1, 2, 3, 4, 5, 6])
    out = left_padded(items, ends=np.array([3, 6]), lengths=np.array([2, 3]), width=4)
    assert out.tolist() == [[0, 0, 2, 3], [0, 4, 5, 6]]


def test_batches_are_trimmed_shifted_and_negatives_valid():
    data = make_synthetic(num_users=300, num_items=60, num_topics=5, seed=3)
    split = LeaveOneOut(data)
    batches = TrainBatches(split, maxlen=12, batch_size=32, sampler=NegativeSampler(data.num_items, history=split))
    rng = np.random.default_rng(0)
    seen_users = []
    for batch in batches.epoch(rng):
        seq, pos, neg, users = (getattr(batch, k).numpy() for k in ("inputs", "positives", "negatives", "users"))
        assert batch.rows.tolist() == np.flatnonzero(pos != 0).tolist()
        seen_users.extend(users)
        real = pos != 0
        lengths = batches.seq_lengths[users]
        assert seq.shape[1] == lengths.max() <= 12  # trimmed to the longest real sequence
        assert (real.sum(1) == lengths).all() and ((seq != 0) == real).all()
        assert (seq[:, 1:][real[:, 1:] & real[:, :-1]] == pos[:, :-1][real[:, 1:] & real[:, :-1]]).all()
        assert (neg[~real] == 0).all() and (neg[real] > 0).all()
        assert not (split.in_history(users, neg) & real).any()
        for b, u in enumerate(users):  # the last positive is the last training item
            assert pos[b, -1] == data.items[split.starts[u] + split.train_lengths[u] - 1]
    assert sorted(seen_users) == sorted(batches.users.tolist())


def test_bucketing_cuts_padding():
    split = LeaveOneOut(make_synthetic(num_users=2000, num_items=500, seed=1))
    def padded_cells(bucket):
        b = TrainBatches(split, maxlen=50, batch_size=64, bucket_batches=bucket)
        return sum(x.inputs.numel() for x in b.epoch(np.random.default_rng(0)))
    real = TrainBatches(split, maxlen=50, batch_size=64).seq_lengths[TrainBatches(split, 50, 64).users].sum()
    assert padded_cells(32) < 1.3 * real < padded_cells(1)


def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=5), make_synthetic(seed=5)
    np.testing.assert_array_equal(a.items, b.items)
    assert a.num_items == 3000 and a.num_users == 4000
    assert not np.array_equal(a.items[:1000], make_synthetic(seed=6).items[:1000])


def test_chunked_parsing_matches_one_chunk_and_names_lines_past_the_first_chunk(tmp_path, monkeypatch):
    from readers import logs
    users = [3, 1, 2, 1, 3, 2, 1, 3, 2, 1] * 3
    rows = [f"{u},{i},{t}" for u, i, t in zip(users, range(30, 0, -1), range(30), strict=True)]
    path = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    whole = load_interactions(path)
    monkeypatch.setattr(logs, "CHUNK_ROWS", 7)
    chunked = load_interactions(path)
    for name in ("offsets", "items", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(chunked, name))
    rows[21] = "2,x9,21"  # file line 23: the header is line 1; the 4th chunk
    with pytest.raises(DataError, match=r"log2.csv:23: item id 'x9' is not an integer"):
        load_interactions(write(tmp_path, "log2.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n"))


def test_time_column_is_read_one_way_across_chunks(tmp_path, monkeypatch):
    from readers import logs
    monkeypatch.setattr(logs, "CHUNK_ROWS", 3)
    header = "user_id,item_id,timestamp\n"
    # day-first dates: the first chunk reads as month-first (10/01 .. 12/01), so 13/01 cannot fit it
    days = "".join(f"1,{i},{d}/01/2020\n" for i, d in zip(range(1, 7), range(10, 16), strict=True))
    with pytest.raises(DataError, match=r"dates.csv:5: column 'timestamp' expected a date like the first one"):
        load_interactions(write(tmp_path, "dates.csv", header + days))
    mixed = "".join(f"1,{i},{1000 + i}\n" for i in range(1, 5)) + "1,5,2020-01-01\n"
    with pytest.raises(DataError, match=r"mixed.csv:6: column 'timestamp' expected a number"):
        load_interactions(write(tmp_path, "mixed.csv", header + mixed))
    iso = "".join(f"{u},{i},2020-01-{d:02d}\n" for u, i, d in [(1, 5, 9), (1, 6, 2), (2, 7, 1), (1, 8, 5), (2, 9, 3)])
    data = load_interactions(write(tmp_path, "iso.csv", header + iso))
    assert data.item_ids[data.items - 1].tolist() == ["6", "8", "5", "7", "9"]  # user 1 by date, then user 2


def test_minus_zero_is_a_string_id_not_zero(tmp_path):
    data = load_interactions(write(tmp_path, "log.txt", "0 1\n0 2\n-0 3\n-0 1\na 1\na 2\n"), "pairs")
    assert sorted(data.user_ids.tolist()) == ["-0", "0", "a"]


def test_mean_rows_makes_position_weights_average_one():
    """--loss_reduction position scales a batch by rows / mean_rows: over an epoch those scales average 1."""
    split = LeaveOneOut(make_synthetic(num_users=700, num_items=300, seed=2))
    batches = TrainBatches(split, maxlen=20, batch_size=64)
    rows = [len(b.rows) for b in batches.epoch(np.random.default_rng(0))]
    assert len(rows) == len(batches) == 11
    assert batches.mean_rows == pytest.approx(sum(rows) / len(rows))
    assert max(rows) > 2 * min(rows)  # bucketing: the scales differ batch to batch
