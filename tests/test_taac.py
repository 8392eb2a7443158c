"""The competition workload: both layouts, feature families, action weights, the competition score, inference."""
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import taac_synthetic
from dataset import DataError, Interactions, LeaveOneOut, TrainBatches
from eval.competition import main as competition_main
from eval.competition import read_bin, seen_candidates, write_bin
from eval.infer import build_index, search
from eval.metrics import metrics_from_ranks, weighted_score
from main import main as train_main
from model import SASRec
from objectives.losses import bce_loss, softmax_loss
from readers import taac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def log():
    return taac_synthetic.generate(300, 200, seed=3, mm_ids=("81", "82"))


@pytest.fixture(scope="module")
def folders(log, tmp_path_factory):
    base = tmp_path_factory.mktemp("taac")
    train, predict, truth = taac_synthetic.split_predict(log, 30)
    taac_synthetic.write_jsonl_layout(str(base / "jsonl"), train)
    taac_synthetic.write_parquet_layout(str(base / "parquet"), train)
    taac_synthetic.write_jsonl_predict(str(base / "jsonl_eval"), train, predict)
    with open(base / "jsonl_eval" / "truth.json", "w") as f:
        json.dump(truth, f)
    return base


def test_both_layouts_load_to_identical_arrays(folders):
    a = taac.read_taac(str(folders / "jsonl"), ["81", "82"])
    b = taac.read_taac(str(folders / "parquet"), ["81", "82"])
    for name in ("offsets", "items", "user_ids", "item_ids", "actions", "times"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for side in ("item_side", "user_side"):
        fa, fb = getattr(a, side), getattr(b, side)
        assert [f.name for f in fa.features] == [f.name for f in fb.features]
        for x, y in zip(fa.features, fb.features, strict=True):
            np.testing.assert_array_equal(x.values, y.values, err_msg=x.name)
            assert x.vocab_size == y.vocab_size
        for x, y in zip(fa.vectors, fb.vectors, strict=True):
            np.testing.assert_array_equal(x.vectors, y.vectors)
            np.testing.assert_array_equal(x.present, y.present)
    assert [v.vectors.shape for v in a.item_side.vectors] == [(201, 32), (201, 1024)]
    assert a.item_side.vectors[1].vectors.dtype == np.float16
    assert a.user_side.features[0].values.shape[0] == a.num_users == 270


def test_cache_round_trips_every_array(folders, tmp_path):
    first = taac.load_taac(str(folders / "parquet"), str(tmp_path), ["81"])
    again = taac.load_taac(str(folders / "parquet"), str(tmp_path), ["81"])
    assert isinstance(again.items, np.memmap)
    for name in ("offsets", "items", "actions", "times"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    for x, y in zip(first.user_side.features + first.item_side.features,
                    again.user_side.features + again.item_side.features, strict=True):
        assert x.name == y.name and x.vocab_size == y.vocab_size
        np.testing.assert_array_equal(x.values, y.values)
    np.testing.assert_array_equal(first.item_side.vectors[0].vectors, again.item_side.vectors[0].vectors)


def test_conversions_land_in_a_home_cell_and_clicks_follow_the_chain():
    """Planted (what --next_action can find): a conversion is drawn from the user's home cells, whose category
    is user feature 103; a click follows the browsing chain and is home by category less than half the time."""
    log = taac_synthetic.generate(500, 5000, seed=1)  # ~17 items a cell: no empty home cell
    user = np.repeat(np.arange(len(log.user_raw)), np.diff(log.offsets))
    home = log.item_features["100"][log.items - 1] == log.user_sparse["103"][user]
    conversion, click = log.actions == taac_synthetic.CONVERSION, log.actions == taac_synthetic.CLICK
    assert 0.08 < conversion.sum() / (conversion.sum() + click.sum()) < 0.12
    assert home[conversion].all() and home[click].mean() < 0.5


def test_cold_items_are_withheld_from_training_and_offered_at_evaluation(tmp_path):
    """--cold_items: the withheld creatives' events leave the training sequences (the rest stay in order), and
    they leave its indexer; the evaluation folder offers every creative, and some hidden clicks land on them."""
    truth = taac_synthetic.write(str(tmp_path), "parquet", 300, 200, seed=3, predict_users=60, cold_items=0.2)
    with open(tmp_path / "eval" / "cold.json") as f:
        cold = set(json.load(f))
    log = taac_synthetic.generate(360, 200, seed=3)
    train, _, same_truth = taac_synthetic.split_predict(log, 60)
    assert truth == same_truth and len(cold) == 40 and cold <= set(log.creative_ids.tolist())
    expected = {}  # user -> creative ids of their training events, the cold ones removed
    for u, raw in enumerate(train.user_raw):
        seq = [int(train.creative_ids[i - 1]) for i in train.items[train.offsets[u]:train.offsets[u + 1]]]
        if len([c for c in seq if c not in cold]) >= 2:
            expected[str(raw)] = [c for c in seq if c not in cold]
    data = taac.read_taac(str(tmp_path / "train"), ["81"])
    got = {u: [int(data.item_ids[i - 1]) for i in data.items[data.offsets[k]:data.offsets[k + 1]]]
           for k, u in enumerate(data.user_ids)}
    assert got == expected and len(got) < len(train.user_raw)  # a few users had fewer than 2 events left
    assert len(data.item_ids) == 160 and not cold & {int(c) for c in data.item_ids}
    candidates = pd.read_parquet(tmp_path / "eval" / "candidate")
    assert set(candidates["creative_id"].tolist()) == set(log.creative_ids.tolist())
    assert 0 < sum(c in cold for c in truth.values()) < len(truth)


def test_fbin_files_round_trip(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    ids = np.array([3, 1, 2 ** 40, 0, 9, 8, 7], np.uint64)
    write_bin(str(tmp_path / "e.fbin"), vectors)
    write_bin(str(tmp_path / "id.u64bin"), ids)
    raw = (tmp_path / "e.fbin").read_bytes()
    assert np.frombuffer(raw[:8], np.uint32).tolist() == [7, 5] and len(raw) == 8 + 7 * 5 * 4
    np.testing.assert_array_equal(read_bin(str(tmp_path / "e.fbin"), np.float32), vectors)
    np.testing.assert_array_equal(read_bin(str(tmp_path / "id.u64bin"), np.uint64).ravel(), ids)


def test_action_weights_weight_each_rows_loss_as_by_hand():
    pos, neg, w = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.5])
    sp = lambda x: float(np.log1p(np.exp(x)))  # noqa: E731  softplus
    by_hand = (1.0 * (sp(-1) + sp(0)) + 2.5 * (sp(1) + sp(2))) / 3.5
    assert bce_loss(pos, neg, weights=w).item() == pytest.approx(by_hand, rel=1e-6)
    # softmax: row r's loss is -log softmax([pos_r, q_r . pool])[0]; weighted mean over rows
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool, pool_ids, pos_ids = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]), torch.tensor([5, 6, 7]), \
        torch.tensor([1, 6])  # row 1's positive is pool entry 6: an accidental hit, masked
    pos_logits = torch.tensor([0.5, 0.25])
    row0 = -F.log_softmax(torch.tensor([0.5, 1.0, 2.0, 0.0]), 0)[0]
    row1 = -F.log_softmax(torch.tensor([0.25, 1.0, -1.0]), 0)[0]
    expected = (1.0 * row0 + 2.5 * row1) / 3.5
    weighted = softmax_loss(q, pos_logits, pool, pool_ids, pos_ids, weights=w)
    assert weighted.item() == pytest.approx(expected.item(), 1e-6)
    plain = softmax_loss(q, pos_logits, pool, pool_ids, pos_ids)
    assert plain.item() == pytest.approx(((row0 + row1) / 2).item(), 1e-6)


def test_positive_actions_leave_exposure_targets_out(folders):
    data = taac.read_taac(str(folders / "jsonl"))
    split = LeaveOneOut(data)
    weights = np.array([0.0, 1.0, 2.5], np.float32)  # exposures never targets, conversions 2.5
    batches = TrainBatches(split, 20, 64, target_weights=weights)
    batch = batches.make_batch(np.arange(64), np.random.default_rng(0))
    idx = np.flatnonzero(batch.positives.numpy().ravel())
    assert len(batch.rows) < len(idx)  # some targets were exposures
    users = np.repeat(np.arange(64), batch.positives.shape[1])
    ends = split.starts[:64] + split.train_lengths[:64]
    width = batch.positives.shape[1]
    col = np.tile(np.arange(width), 64)
    event = ends[users] - width + col  # flat index of each position's target
    expected_rows = np.flatnonzero((batch.positives.numpy().ravel() != 0) & (data.actions[np.maximum(event, 0)] != 0))
    np.testing.assert_array_equal(batch.rows.numpy(), expected_rows)
    np.testing.assert_array_equal(batch.weights.numpy(), weights[data.actions[event[expected_rows]]])
    assert batch.actions.shape == batch.inputs.shape and batch.times.shape == batch.inputs.shape + (4,)
    assert ((batch.actions == 0) == (batch.inputs == 0)).all()


def test_competition_score_and_click_only_evaluation(folders):
    ranks = np.array([0, 3, 20, 9])  # hits at ranks 1, 4, 10; one miss
    m = metrics_from_ranks(ranks)
    hr, ndcg = 0.75, (1 + 1 / np.log2(5) + 1 / np.log2(11)) / 4
    assert m["score"] == pytest.approx(0.31 * hr + 0.69 * ndcg)
    w = np.array([1.0, 2.5, 0.0, 1.0])  # click, conversion, exposure, click
    by_hand = (0.31 * (1 + 2.5 + 1) + 0.69 * (1 + 2.5 / np.log2(5) + 1 / np.log2(11))) / 4.5
    assert weighted_score(ranks, w) == pytest.approx(by_hand)
    data = taac.read_taac(str(folders / "jsonl"))
    all_users = LeaveOneOut(data).eval_arrays("test")
    clicks = LeaveOneOut(data, eval_actions=(1,)).eval_arrays("test")
    assert len(clicks[0]) < len(all_users[0]) and (data.actions[clicks[1]] == 1).all()


def run_quiet(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        fn(argv)


FAMILY_BASE = ["--device", "cpu", "--maxlen", "30", "--hidden_units", "32", "--num_blocks", "1", "--batch_size", "128",
               "--num_epochs", "6", "--eval_every", "6", "--use_infonce", "--keep_history", "--eval_actions", "1", "2",
               "--cache_dir", "", "--positive_actions", "1", "2"]


def test_item_features_and_multimodal_vectors_are_needed(tmp_path):
    """Planted: an item's category is feature 100, its topic only its multimodal vector, and items are too
    many for ids alone (3,000 items, ~10 clicks per user). Measured with these settings, mean test score of
    seeds 0 and 1: full 0.107, without item features 0.062, without the vectors 0.073; asked: a 0.01 margin."""
    scores = {"full": [], "no_item_features": [], "no_mm": []}
    for seed in (0, 1):
        taac_synthetic.write(str(tmp_path / f"s{seed}"), "jsonl", 1500, 3000, seed=seed, predict_users=10)
        data = ["--data", str(tmp_path / f"s{seed}" / "train"), "--seed", str(seed)]
        mm = ["--mm_emb_id", "81"]
        for name, extra in (("full", mm), ("no_item_features", mm + ["--item_feature_ids"]), ("no_mm", [])):
            run_dir = str(tmp_path / f"run{seed}_{name}")
            args = FAMILY_BASE + data + extra + ["--run_dir", run_dir]
            run_quiet(train_main, args)
            with open(os.path.join(run_dir, "results.json")) as f:
                scores[name].append(json.load(f)["test"]["score"])
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    print("family ablation, mean test score of 2 seeds:", mean)
    assert mean["full"] > mean["no_item_features"] + 0.01, mean
    assert mean["full"] > mean["no_mm"] + 0.01, mean


def test_competition_inference_writes_the_baseline_outputs(folders, tmp_path):
    run_dir = str(tmp_path / "run")
    run_quiet(train_main, ["--data", str(folders / "jsonl"), "--mm_emb_id", "81", "--device", "cpu", "--maxlen", "20",
                           "--hidden_units", "16", "--num_blocks", "1", "--num_epochs", "1", "--cache_dir", "",
                           "--time_features", "--run_dir", run_dir])
    eval_dir = tmp_path / "eval"
    shutil.copytree(folders / "jsonl_eval", eval_dir)
    with open(eval_dir / "predict_set.jsonl", "a") as f:  # a creative training never saw
        f.write(json.dumps({"creative_id": 999999999, "retrieval_id": 200, "features": {"100": 3}}) + "\n")
    out = str(tmp_path / "out")
    run_quiet(competition_main, ["--ckpt", os.path.join(run_dir, "ckpt"), "--eval_data", str(eval_dir), "--out", out,
                                 "--keep_history"])  # the files' own ranking: no creative of the user's filtered
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert len(result["user"]) == len(result["top10s"]) == 30
    assert all(len(row) == 10 and len(set(row)) == 10 for row in result["top10s"])
    assert result["user"][0].startswith("user_")
    items, ids, queries = (read_bin(os.path.join(out, n), t) for n, t in
                           (("embedding.fbin", np.float32), ("id.u64bin", np.uint64), ("query.fbin", np.float32)))
    assert items.shape == (201, 16) and ids.ravel()[-1] == 200 and queries.shape == (30, 16)
    assert np.abs(items[-1]).sum() > 0  # the new creative has a vector from its features
    # the query is the user's whole sequence: exact search over the files gives the same top-10
    top = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :10]
    with open(eval_dir / "predict_set.jsonl") as f:
        creatives = [json.loads(line)["creative_id"] for line in f]
    assert [[creatives[i] for i in row] for row in top][:5] == result["top10s"][:5]
    assert os.path.isfile(os.path.join(out, "score.json"))


def test_competition_inference_rebuilds_an_hstu_model_with_a_time_bias(folders, tmp_path):
    """No encoder flag at inference: the checkpoint's config rebuilds HSTU layers and their biases, and the
    users' event times reach them (the prediction time unknown: each last event's own time)."""
    from encoders.hstu import HSTULayer
    from training import checkpoint
    run_dir = str(tmp_path / "run")
    run_quiet(train_main, ["--data", str(folders / "jsonl"), "--mm_emb_id", "81", "--device", "cpu", "--maxlen", "20",
                           "--hidden_units", "16", "--num_blocks", "2", "--num_epochs", "1", "--cache_dir", "",
                           "--encoder", "hstu", "--attn_bias", "position,time", "--run_dir", run_dir])
    model = SASRec.from_checkpoint(checkpoint.load(os.path.join(run_dir, "ckpt", "best.pt")))
    assert all(isinstance(layer, HSTULayer) and layer.rel_bias.time is not None for layer in model.blocks)
    out = str(tmp_path / "out")
    run_quiet(competition_main, ["--ckpt", os.path.join(run_dir, "ckpt"), "--eval_data", str(folders / "jsonl_eval"),
                                 "--out", out])
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert len(result["top10s"]) == 30 and all(len(set(row)) == 10 for row in result["top10s"])
    assert np.isfinite(read_bin(os.path.join(out, "query.fbin"), np.float32)).all()


@pytest.fixture(scope="module")
def history_ckpts(folders, tmp_path_factory):
    """One tiny checkpoint trained without --keep_history, and a copy whose config.json says keep_history = true
    (an evaluation setting: no checkpoint check covers it)."""
    base = tmp_path_factory.mktemp("history")
    run_quiet(train_main, ["--data", str(folders / "jsonl"), "--mm_emb_id", "81", "--device", "cpu", "--maxlen", "20",
                           "--hidden_units", "16", "--num_blocks", "1", "--num_epochs", "1", "--cache_dir", "",
                           "--run_dir", str(base / "run")])
    filtered, kept = base / "run" / "ckpt", base / "kept"
    shutil.copytree(filtered, kept)
    config = json.loads((kept / "config.json").read_text())
    assert config["keep_history"] is False
    (kept / "config.json").write_text(json.dumps({**config, "keep_history": True}))
    return {"filtered": str(filtered), "kept": str(kept)}


def competition_run(ckpt, out, eval_dir, *flags):
    """(result.json, what eval/competition.py printed) of one run."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        competition_main(["--ckpt", ckpt, "--eval_data", str(eval_dir), "--out", str(out), "--device", "cpu", *flags])
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f), printed.getvalue()


def test_competition_filters_each_users_own_creatives_unless_history_is_kept(folders, history_ckpts, tmp_path):
    """Filtered: no creative of the user's evaluation-folder sequence, still 10 distinct, the exact ranking with
    those removed; kept: today's unfiltered search over the written files, exactly. The default is the
    checkpoint's keep_history; --keep_history / --no-keep_history override it both ways."""
    import faiss
    eval_dir = folders / "jsonl_eval"
    runs = {name: competition_run(history_ckpts[ckpt], tmp_path / name, eval_dir, *flags) for name, ckpt, flags in (
        ("filtered", "filtered", ()), ("kept", "kept", ()),
        ("forced_kept", "filtered", ("--keep_history",)), ("forced_filtered", "kept", ("--no-keep_history",)))}
    assert "(history filtered)" in runs["filtered"][1] and "(history kept)" in runs["kept"][1]
    assert runs["forced_kept"][0]["top10s"] == runs["kept"][0]["top10s"]
    assert runs["forced_filtered"][0]["top10s"] == runs["filtered"][0]["top10s"]
    filtered, kept = runs["filtered"][0], runs["kept"][0]
    assert filtered["user"] == kept["user"]
    for name in ("embedding.fbin", "id.u64bin", "query.fbin"):  # only the ranking changes
        assert (tmp_path / "filtered" / name).read_bytes() == (tmp_path / "kept" / name).read_bytes()

    data = taac.read_taac(str(eval_dir), seq_file="predict_seq.jsonl")
    seen = {u: {int(c) for c in data.item_ids[data.items[s:e] - 1]}
            for u, s, e in zip(data.user_ids, data.offsets[:-1], data.offsets[1:], strict=True)}
    items = read_bin(str(tmp_path / "kept" / "embedding.fbin"), np.float32)
    queries = read_bin(str(tmp_path / "kept" / "query.fbin"), np.float32)
    with open(eval_dir / "predict_set.jsonl") as f:
        creatives = [json.loads(line)["creative_id"] for line in f]
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    _, top = index.search(queries, 10)  # what eval/competition.py searched before it filtered
    assert [[creatives[i] for i in row] for row in top] == kept["top10s"]
    assert sum(len(seen[u] & set(row)) for u, row in zip(kept["user"], kept["top10s"], strict=True)) > 0
    _, ranking = index.search(queries, len(items))  # the whole ranking, to remove the seen creatives from by hand
    for u, row, ranked in zip(filtered["user"], filtered["top10s"], ranking, strict=True):
        assert len(row) == len(set(row)) == 10 and not seen[u] & set(row)
        assert row == [c for c in (creatives[i] for i in ranked) if c not in seen[u]][:10]


def test_a_seen_top_creative_is_replaced_by_the_eleventh():
    """By hand: candidate j scores 12 - j for the one query; a seen candidate leaves the list and the next
    unseen one moves up; sequence creatives that are no candidate change nothing; fewer than k left: -1."""
    vectors = np.arange(12, 0, -1, dtype=np.float32)[:, None]
    cand_rows = np.array([7, 3, 12, 5, 1, 9, 2, 11, 4, 6, 8, 10])  # candidate j's tower row
    index = build_index(vectors, "flat", "cpu", verbose=False)
    histories = [[7, 50], [50, 51], [5, 7, 5], [7, 3, 12, 5, 1]]  # tower rows; 50, 51: no candidate
    lengths = np.array([len(h) for h in histories])
    data = Interactions(np.concatenate([[0], np.cumsum(lengths)]), np.concatenate(histories), np.array(list("abcd")),
                        np.array([]))
    exclude = seen_candidates(data, cand_rows)
    assert [sorted(e.tolist()) for e in exclude] == [[0], [], [0, 3, 3], [0, 1, 2, 3, 4]]
    ids, _ = search(index, np.ones((4, 1), np.float32), 10, exclude)
    assert ids.tolist() == [list(range(1, 11)), list(range(10)), [1, 2, 4, 5, 6, 7, 8, 9, 10, 11],
                            [5, 6, 7, 8, 9, 10, 11, -1, -1, -1]]
    assert search(index, np.ones((4, 1), np.float32), 10)[0].tolist() == [list(range(10))] * 4


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_a_folder_missing_a_part_is_one_line_and_exit_2(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders / "jsonl", broken)
    os.remove(broken / "indexer.pkl")
    r = cli("--data", str(broken), "--num_epochs", "1", "--cache_dir", "", "--run_dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "missing indexer.pkl" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_bad_competition_input_names_what_is_wrong(folders, tmp_path):
    with pytest.raises(DataError, match=r"--item_feature_ids 999: not in .* item features \(found 100 101"):
        taac.read_taac(str(folders / "jsonl"), item_feature_ids=["999"])
    bad = tmp_path / "bad"
    shutil.copytree(folders / "jsonl", bad)
    lines = (bad / "seq.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]  # a truncated line
    (bad / "seq.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"seq\.jsonl:3: expected a JSON list of \[user_id, item_id"):
        taac.read_taac(str(bad))
    dims = tmp_path / "dims"
    shutil.copytree(folders / "jsonl", dims)
    part = dims / "creative_emb" / "emb_82_1024" / "part-00000.json"
    lines = part.read_text().splitlines()
    row = json.loads(lines[1])
    lines[1] = json.dumps({"anonymous_cid": row["anonymous_cid"], "emb": row["emb"][:512]})
    part.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"emb_82_1024/part-00000\.json:2: vector of 512 values, expected 1024"):
        taac.read_taac(str(dims), ["82"])


def test_an_item_without_features_gets_unknown_codes(folders, tmp_path):
    """Documented default: an item of seq.jsonl missing from item_feat_dict.json has 'unknown' (1) everywhere."""
    gap = tmp_path / "gap"
    shutil.copytree(folders / "jsonl", gap)
    with open(gap / "item_feat_dict.json") as f:
        table = json.load(f)
    data = taac.read_taac(str(folders / "jsonl"))
    item = int(data.items[0])
    del table[str(item)]
    with open(gap / "item_feat_dict.json", "w") as f:
        json.dump(table, f)
    values = taac.read_taac(str(gap)).item_side.features[0].values
    assert values[item].tolist() == [1] and values[0].tolist() == [0] and values[item + 1 if item < 200 else 1][0] > 1


def test_pickled_files_are_read_without_resolving_globals(folders, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo hacked",))
    evil = tmp_path / "evil"
    shutil.copytree(folders / "jsonl", evil)
    with open(evil / "indexer.pkl", "wb") as f:
        pickle.dump({"u": {}, "i": {}, "f": Payload()}, f)
    with pytest.raises(DataError, match=r"indexer\.pkl: refused pickle global (posix|nt)\.system"):
        taac.read_taac(str(evil))


def test_feature_columns_become_codes_and_continual_vectors():
    """Integers are value re-ids (code = value + 1, 1 unknown), lists array features, floats continual."""
    columns = {"100": [3, None, 7], "106": [[1, 2], [], None], "200": [0.5, None, 1.25]}
    features, continual = taac.encode_columns(columns, 3, None, "--item_feature_ids", "DIR", "item")
    assert [f.name for f in features] == ["100", "106"] and [v.name for v in continual] == ["200"]
    assert features[0].values.tolist() == [[0], [4], [1], [8]]  # row 0 is the padding item
    assert features[1].values.tolist() == [[0, 0], [2, 3], [1, 0], [1, 0]]
    assert features[0].vocab_size == 9
    np.testing.assert_array_equal(continual[0].vectors.ravel(), [0, 0.5, 0, 1.25])
    np.testing.assert_array_equal(continual[0].present, [False, True, False, True])
