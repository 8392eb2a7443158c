"""Hostile competition folders: each malformed input is one line naming the file (and line, id, feature), or is
handled by a documented rule, in the readers (taac.py) and in competition inference (eval/competition.py)."""
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import taac_synthetic
from conftest import ROOT
from dataset import DataError
from eval.competition import main as competition_main
from eval.infer import main as infer_main
from main import main as train_main
from readers import taac
from readers.features import UNKNOWN, read_vectors

TRAIN = ["--device", "cpu", "--maxlen", "20", "--hidden_units", "16", "--num_blocks", "1", "--num_epochs", "1",
         "--batch_size", "64"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Training and evaluation folders of both layouts (40 items, 2 multimodal features) and a checkpoint."""
    base = tmp_path_factory.mktemp("inputs")
    log = taac_synthetic.generate(90, 40, seed=5, mm_ids=("81", "82"))
    train, predict, _ = taac_synthetic.split_predict(log, 10)
    taac_synthetic.write_jsonl_layout(str(base / "jsonl"), train)
    taac_synthetic.write_parquet_layout(str(base / "parquet"), train)
    taac_synthetic.write_jsonl_predict(str(base / "jsonl_eval"), train, predict)
    taac_synthetic.write_parquet_predict(str(base / "parquet_eval"), train, predict)
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(["--data", str(base / "jsonl"), "--mm_emb_id", "81", "--cache_dir", "", "--time_features",
                    "--run_dir", str(base / "run"), *TRAIN])
    return base


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def compete(capsys, ckpt, eval_dir, out, *extra):
    """(exit status, stdout, stderr) of eval/competition.py."""
    capsys.readouterr()
    try:
        competition_main(["--ckpt", str(ckpt), "--eval_data", str(eval_dir), "--out", str(out), "--device", "cpu",
                          *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, expected_code=2):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def edit_jsonl(path, line, edit):
    """Rewrite JSON line `line` (1-based) of a file with edit(value)."""
    lines = path.read_text().splitlines()
    lines[line - 1] = json.dumps(edit(json.loads(lines[line - 1])))
    path.write_text("\n".join(lines) + "\n")


def read_parquet(folder):
    return pq.read_table(next(p for p in sorted(folder.iterdir()) if p.suffix == ".parquet"))


def write_parquet(folder, table):
    for p in folder.iterdir():
        p.unlink()
    pq.write_table(table, folder / "part-00000.parquet")


def set_column(table, name, values, type=None):
    return table.set_column(table.column_names.index(name), name, pa.array(values, type=type))


# ----------------------------------------------------------------------------- 1. non-finite values

def test_nan_in_a_pickled_multimodal_vector_is_named(base, tmp_path):
    folder = copy(base / "jsonl", tmp_path / "f")
    pkl = folder / "creative_emb" / "emb_81_32.pkl"
    with open(pkl, "rb") as f:
        table = pickle.load(f)
    cid = list(table)[4]
    table[cid] = table[cid].copy()
    table[cid][3] = np.nan
    with open(pkl, "wb") as f:
        pickle.dump(table, f)
    with pytest.raises(DataError, match=rf"emb_81_32\.pkl: creative {cid}'s emb_81 vector holds nan at position 3"):
        taac.read_taac(str(folder), ["81"])


@pytest.mark.parametrize("value, shown", [(float("inf"), "inf"), (70000.0, "70000.0")])
def test_inf_or_beyond_float16_in_a_json_lines_vector_is_named(base, tmp_path, value, shown):
    folder = copy(base / "jsonl", tmp_path / "f")
    part = folder / "creative_emb" / "emb_82_1024" / "part-00000.json"
    row = json.loads(part.read_text().splitlines()[2])
    edit_jsonl(part, 3, lambda r: {**r, "emb": r["emb"][:7] + [value] + r["emb"][8:]})
    with pytest.raises(DataError, match=rf"part-00000\.json:3: creative {row['anonymous_cid']}'s emb_82 vector "
                                        rf"holds {shown} at position 7"):
        taac.read_taac(str(folder), ["82"])


def test_nan_in_a_parquet_multimodal_vector_is_named(base, tmp_path):
    folder = copy(base / "parquet", tmp_path / "f")
    mm = folder / "mm_emb" / "emb_81_32_parquet"
    table = read_parquet(mm)
    emb = table.column("emb").to_pylist()
    emb[5][0] = float("nan")
    write_parquet(mm, set_column(table, "emb", emb, pa.list_(pa.float32())))
    cid = table.column("anonymous_cid")[5].as_py()
    with pytest.raises(DataError, match=rf"emb_81_32_parquet: creative {cid}'s emb_81 vector holds nan at position 0"):
        taac.read_taac(str(folder), ["81"])


def test_non_finite_continual_features_are_named(base, tmp_path):
    folder = copy(base / "jsonl", tmp_path / "f")
    path = folder / "item_feat_dict.json"
    table = json.loads(path.read_text())
    for key in table:
        table[key]["200"] = 0.5
    table["7"]["200"] = float("nan")
    path.write_text(json.dumps(table))  # NaN, as Python's json writes it
    with pytest.raises(DataError, match=r"item_feat_dict\.json: item 7: feature 200 is nan"):
        taac.read_taac(str(folder))
    pq_folder = copy(base / "parquet", tmp_path / "p")
    users = read_parquet(pq_folder / "user_feat")
    values = [0.25] * users.num_rows
    values[2] = float("inf")
    write_parquet(pq_folder / "user_feat", users.append_column("300", pa.array(values)))
    user = users.column("user_id")[2].as_py()
    with pytest.raises(DataError, match=rf"user_feat: user {user}: feature 300 is inf"):
        taac.read_taac(str(pq_folder))


def test_non_finite_item_emb_rows_are_named(tmp_path):
    vectors = np.ones((3, 4), np.float32)
    vectors[1, 2] = np.nan
    np.savez(tmp_path / "v.npz", ids=np.array(["a", "b", "c"]), vectors=vectors)
    with pytest.raises(DataError, match=r"--item_emb .*v\.npz: row 1 \(item 'b'\) holds nan at position 2"):
        read_vectors(str(tmp_path / "v.npz"), {"a": 1, "b": 2, "c": 3})
    vectors[1, 2] = 1e6  # finite in float32, infinite once the tower stores it as float16
    np.savez(tmp_path / "v.npz", ids=np.array(["a", "b", "c"]), vectors=vectors)
    with pytest.raises(DataError, match=r"row 1 \(item 'b'\) holds 1000000\.0 at position 2"):
        read_vectors(str(tmp_path / "v.npz"), {"a": 1, "b": 2, "c": 3})


def poison_vector(folder, position=4):
    """Creative `position` of emb_81_32.pkl gets a NaN; returns its item re-id."""
    pkl = folder / "creative_emb" / "emb_81_32.pkl"
    with open(pkl, "rb") as f:
        table = pickle.load(f)
    cid = list(table)[position]
    table[cid] = np.full(32, np.nan, np.float32)
    with open(pkl, "wb") as f:
        pickle.dump(table, f)
    with open(folder / "indexer.pkl", "rb") as f:
        return pickle.load(f)["i"][cid]


def test_non_finite_zero_policy_treats_vectors_as_absent_and_keys_the_cache(base, tmp_path, capsys):
    folder = copy(base / "jsonl", tmp_path / "f")
    item = poison_vector(folder)
    data = taac.load_taac(str(folder), str(tmp_path / "cache"), ["81"], non_finite="zero")
    vectors = data.item_side.vectors[0]
    assert not vectors.present[item] and not np.asarray(vectors.vectors[item]).any()
    assert np.isfinite(np.asarray(vectors.vectors, np.float32)).all() and vectors.present[1:].sum() == 39
    assert "1 emb_81 vectors with non-finite values treated as absent (--non_finite zero)" in capsys.readouterr().out
    with pytest.raises(DataError, match="holds nan"):  # not served the 'zero' parse from the cache
        taac.load_taac(str(folder), str(tmp_path / "cache"), ["81"])


def test_training_on_a_non_finite_folder_blames_the_file_or_follows_the_flag(base, tmp_path):
    folder = copy(base / "jsonl", tmp_path / "f")
    poison_vector(folder)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--data", str(folder), "--mm_emb_id", "81",
                        "--cache_dir", "", "--run_dir", str(tmp_path / "r"), *TRAIN], capture_output=True, text=True,
                       cwd=ROOT)
    line = one_error_line(r.returncode, r.stderr)
    assert "emb_81_32.pkl: creative" in line and "holds nan" in line and "loss" not in line
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_main(["--data", str(folder), "--mm_emb_id", "81", "--cache_dir", "", "--non_finite", "zero",
                    "--run_dir", str(tmp_path / "z"), *TRAIN])
    assert "treated as absent" in out.getvalue()
    with open(tmp_path / "z" / "ckpt" / "config.json") as f:
        assert json.load(f)["non_finite"] == "zero"


def test_competition_refuses_a_non_finite_eval_folder_unless_zero(base, tmp_path, capsys):
    eval_dir = copy(base / "jsonl_eval", tmp_path / "eval")
    poison_vector(eval_dir)
    ckpt = base / "run" / "ckpt"
    code, _, err = compete(capsys, ckpt, eval_dir, tmp_path / "out")
    assert "emb_81_32.pkl: creative" in one_error_line(code, err) and not (tmp_path / "out" / "result.json").exists()
    code, _, err = compete(capsys, ckpt, eval_dir, tmp_path / "out", "--non_finite", "zero")
    assert code == 0, err
    for name in ("embedding.fbin", "query.fbin"):
        raw = (tmp_path / "out" / name).read_bytes()
        assert np.isfinite(np.frombuffer(raw[8:], np.float32)).all()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert all(len(row) == 10 for row in result["top10s"])


def nan_checkpoint(src, dst, row=3):
    """A copy of checkpoint folder `src` whose item id embedding row `row` is NaN."""
    shutil.copytree(src, dst)
    ckpt = torch.load(dst / "best.pt", weights_only=True)
    ckpt["model"]["item_tower.id_emb.weight"][row] = float("nan")
    torch.save(ckpt, dst / "best.pt")
    return dst


def test_competition_writes_no_file_with_a_non_finite_row(base, tmp_path, capsys):
    ckpt = nan_checkpoint(base / "run" / "ckpt", tmp_path / "ckpt")
    code, _, err = compete(capsys, ckpt, base / "jsonl_eval", tmp_path / "out")
    line = one_error_line(code, err, expected_code=1)
    assert "vector is not finite" in line and ("user user_" in line or "creative " in line)
    assert not [n for n in os.listdir(tmp_path / "out") if not n.startswith(".")]


def test_infer_writes_no_file_with_a_non_finite_row(tmp_path, capsys):
    rng = np.random.default_rng(0)
    log = tmp_path / "log.txt"
    log.write_text("".join(f"u{u} " + " ".join(map(str, rng.integers(1, 30, 6))) + "\n" for u in range(40)))
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(["--data", str(log), "--cache_dir", "", "--run_dir", str(tmp_path / "run"), *TRAIN])
    ckpt = nan_checkpoint(tmp_path / "run" / "ckpt", tmp_path / "ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        infer_main(["--ckpt", str(ckpt), "--split", "next", "--out", str(tmp_path / "out"), "--device", "cpu"])
    line = one_error_line(e.value.code, capsys.readouterr().err, expected_code=1)
    assert "vector is not finite" in line
    assert not [n for n in os.listdir(tmp_path / "out") if not n.startswith(".")]


# ----------------------------------------------------------------------------- 2. values unseen in training

def test_feature_values_unseen_in_training_become_unknown_at_inference(base, tmp_path, capsys):
    eval_dir = copy(base / "jsonl_eval", tmp_path / "eval")

    def profile(records):
        records[0][2]["103"] = 5000  # a user feature value far past the training vocabulary
        records[0][2]["106"] = [-7, 5000, 3, 4]  # wider than training's arrays too
        for r in records[1:]:
            r[3]["100"] = 5000
            r[4] = 9  # an action type training never saw
        return records
    edit_jsonl(eval_dir / "predict_seq.jsonl", 2, profile)
    table = json.loads((eval_dir / "item_feat_dict.json").read_text())
    for row in table.values():
        row["101"] = 5000
    (eval_dir / "item_feat_dict.json").write_text(json.dumps(table))
    with open(eval_dir / "predict_set.jsonl", "a") as f:  # new creatives with unseen / negative values
        f.write(json.dumps({"creative_id": 999999991, "retrieval_id": 40, "features": {"100": 5000}}) + "\n")
        f.write(json.dumps({"creative_id": 999999992, "retrieval_id": 41, "features": {"100": -7}}) + "\n")
    code, _, err = compete(capsys, base / "run" / "ckpt", eval_dir, tmp_path / "out")
    assert code == 0, err
    assert len(json.loads((tmp_path / "out" / "result.json").read_text())["user"]) == 10


# ----------------------------------------------------------------------------- 3. ids beyond the indexer

@pytest.mark.parametrize("item", [2 ** 64 + 5, 10 ** 9])
def test_an_item_id_far_beyond_the_indexer_is_one_line(base, tmp_path, item):
    folder = copy(base / "jsonl", tmp_path / "f")
    edit_jsonl(folder / "seq.jsonl", 4, lambda records: records[:2] + [[records[2][0], item] + records[2][2:]]
               + records[3:])
    with pytest.raises(DataError, match=rf"seq\.jsonl:4: item id {item} is not in indexer\.pkl's item re-ids 1\.\.40"):
        taac.read_taac(str(folder))


def test_item_feature_keys_beyond_the_indexer_are_skipped_without_sizing_anything(base, tmp_path, capsys):
    folder = copy(base / "jsonl", tmp_path / "f")
    clean = taac.read_taac(str(folder))
    table = json.loads((folder / "item_feat_dict.json").read_text())
    table[str(10 ** 9)] = {"100": 3}  # once sized a list of 10^9 rows
    (folder / "item_feat_dict.json").write_text(json.dumps(table))
    data = taac.read_taac(str(folder))
    assert "1 key(s) outside indexer.pkl's item re-ids 1..40 skipped (e.g. '1000000000')" in capsys.readouterr().out
    for a, b in zip(clean.item_side.features, data.item_side.features, strict=True):
        np.testing.assert_array_equal(a.values, b.values)


def test_parquet_ids_beyond_the_indexer_are_one_line_or_skipped(base, tmp_path):
    folder = copy(base / "parquet", tmp_path / "f")
    items = read_parquet(folder / "item_feat")
    ids = items.column("item_id").to_pylist()
    replaced, ids[3] = ids[3], 10 ** 9
    write_parquet(folder / "item_feat", set_column(items, "item_id", ids, pa.int64()))
    data = taac.read_taac(str(folder))  # the row outside is skipped; the item it replaced has no features now
    assert all(f.values[replaced, 0] == UNKNOWN for f in data.item_side.features)
    folder = copy(base / "parquet", tmp_path / "g")
    seq = read_parquet(folder / "seq")
    rows = seq.column("seq").to_pylist()
    rows[2][1]["item_id"] = 10 ** 9
    user = seq.column("user_id")[2].as_py()
    write_parquet(folder / "seq", set_column(seq, "seq", rows, seq.schema.field("seq").type))
    with pytest.raises(DataError, match=rf"seq: row 3 \(user {user}\): item id 1000000000 is not in indexer\.pkl"):
        taac.read_taac(str(folder))


# ----------------------------------------------------------------------------- 4. empty / plain parquet cells

def test_an_empty_seq_parquet_is_one_line(base, tmp_path):
    folder = copy(base / "parquet", tmp_path / "f")
    seq = read_parquet(folder / "seq")
    write_parquet(folder / "seq", seq.slice(0, 0))
    with pytest.raises(DataError, match=r"seq: no rows \(no users to read\)"):
        taac.read_taac(str(folder))


def test_candidate_features_may_be_plain_values(base, tmp_path, capsys):
    eval_dir = copy(base / "parquet_eval", tmp_path / "eval")
    table = read_parquet(eval_dir / "candidate")
    plain = [v["feature_value"] for v in table.column("100").to_pylist()]
    table = set_column(table, "100", plain, pa.int64())
    table = set_column(table, "101", ["x"] * table.num_rows)  # strings: unknown
    write_parquet(eval_dir / "candidate", table)
    code, _, err = compete(capsys, base / "run" / "ckpt", eval_dir, tmp_path / "out")
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(result["user"]) == 10 and all(len(row) == 10 for row in result["top10s"])


# ----------------------------------------------------------------------------- 5. duplicate users

def split_line(path, line):
    """User on JSON line `line` written on two lines: their profile and first 3 events, then the rest."""
    lines = path.read_text().splitlines()
    records = json.loads(lines[line - 1])
    lines[line - 1:line] = [json.dumps(records[:4]), json.dumps(records[4:])]
    path.write_text("\n".join(lines) + "\n")
    return records


def test_a_user_on_two_lines_is_one_user_in_time_order(base, tmp_path, capsys):
    folder = copy(base / "jsonl", tmp_path / "f")
    whole = taac.read_taac(str(base / "jsonl"))
    lines = (folder / "seq.jsonl").read_text().splitlines()
    records = json.loads(lines[2])  # the profile record, then events in time order
    lines[2:3] = [json.dumps(records[:1] + records[3:]), json.dumps(records[1:3])]  # later events first
    (folder / "seq.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    data = taac.read_taac(str(folder))
    assert "seq.jsonl: 1 user(s) on more than one line merged" in capsys.readouterr().out
    assert data.num_users == whole.num_users
    np.testing.assert_array_equal(data.user_ids, whole.user_ids)
    np.testing.assert_array_equal(data.offsets, whole.offsets)
    times = data.times[data.offsets[2]:data.offsets[3]]
    assert (np.diff(times) >= 0).all()
    order = np.argsort(whole.times[whole.offsets[2]:whole.offsets[3]], kind="stable")
    np.testing.assert_array_equal(data.items[data.offsets[2]:data.offsets[3]],
                                  whole.items[whole.offsets[2]:whole.offsets[3]][order])
    for x, y in zip(data.user_side.features, whole.user_side.features, strict=True):
        np.testing.assert_array_equal(x.values, y.values)  # the first line's profile


def test_duplicate_parquet_rows_are_one_user(base, tmp_path):
    folder = copy(base / "parquet", tmp_path / "f")
    seq = read_parquet(folder / "seq")
    write_parquet(folder / "seq", pa.concat_tables([seq, seq.slice(4, 1)]))
    data = taac.read_taac(str(folder))
    assert data.num_users == seq.num_rows and len(set(data.user_ids.tolist())) == seq.num_rows
    assert data.lengths[4] == 2 * len(seq.column("seq")[4].as_py())


def test_result_json_has_one_row_per_user(base, tmp_path, capsys):
    eval_dir = copy(base / "jsonl_eval", tmp_path / "eval")
    split_line(eval_dir / "predict_seq.jsonl", 3)
    code, _, err = compete(capsys, base / "run" / "ckpt", eval_dir, tmp_path / "out")
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(result["user"]) == len(set(result["user"])) == len(result["top10s"]) == 10


# ----------------------------------------------------------------------------- 6. read-only cached arrays

def test_training_from_a_cache_gives_no_user_warning(base, tmp_path):
    cache = str(tmp_path / "cache")
    taac.load_taac(str(base / "jsonl"), cache, ["81"])  # what main.py asks for: this run reads the cache
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", os.path.join(ROOT, "main.py"), "--data",
                        str(base / "jsonl"), "--mm_emb_id", "81", "--cache_dir", cache, "--time_features",
                        "--run_dir", str(tmp_path / "r"), *TRAIN], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- 7. feature codes of another folder

def test_feature_codes_digest_round_trips_the_cache(base, tmp_path):
    data = taac.load_taac(str(base / "jsonl"), str(tmp_path / "c"), ["81"])
    again = taac.load_taac(str(base / "jsonl"), str(tmp_path / "c"), ["81"])
    with open(base / "jsonl" / "indexer.pkl", "rb") as f:
        digest = taac.feature_codes_digest(pickle.load(f))
    assert len(digest) == 64 and data.feature_codes == again.feature_codes == digest
    assert isinstance(again.items, np.memmap)
    assert taac.feature_codes_digest({"f": {"100": {"a": 1}}}) != taac.feature_codes_digest({"f": {"100": {"a": 2}}})


def test_competition_refuses_an_eval_folder_whose_feature_codes_differ(base, tmp_path, capsys):
    ckpt = copy(base / "run" / "ckpt", tmp_path / "ckpt")
    state = torch.load(ckpt / "best.pt", weights_only=True)
    with open(base / "jsonl_eval" / "indexer.pkl", "rb") as f:
        indexer = pickle.load(f)
    state["data"] = {**(state.get("data") or {}), "feature_codes": taac.feature_codes_digest(indexer)}
    torch.save(state, ckpt / "best.pt")
    code, _, err = compete(capsys, ckpt, base / "jsonl_eval", tmp_path / "out")
    assert code == 0, err
    eval_dir = copy(base / "jsonl_eval", tmp_path / "eval")
    indexer["f"]["100"] = {k: v % 3 + 1 for k, v in indexer["f"]["100"].items()}  # other codes for the values
    with open(eval_dir / "indexer.pkl", "wb") as f:
        pickle.dump(indexer, f)
    code, _, err = compete(capsys, ckpt, eval_dir, tmp_path / "out2")
    line = one_error_line(code, err)
    assert "indexer.pkl: its feature-value map differs from the one the checkpoint was trained with" in line
