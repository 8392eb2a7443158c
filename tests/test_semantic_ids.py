"""--semantic_ids L K: residual k-means codes of the items' vectors as item features, cached, carried by the
checkpoint, and assigned to cold creatives at competition inference with the same function."""
import contextlib
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import taac_synthetic
from conftest import fails_with
from eval import competition
from main import main as train_main
from model import SASRec
from readers import semantic_ids, taac
from readers.features import Vectors
from readers.semantic_ids import assign, quantiser_input, residual_kmeans
from training import checkpoint

COLD = 999_999_999  # a creative of the evaluation folder that training never saw, with a vector
COPIED = 5          # the training item whose vector the cold creative carries


def quiet(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        fn(argv)


def test_two_levels_of_two_centroids_split_clusters_then_offsets_and_leave_missing_vectors_out():
    """1-d points around -10 and 10: level 0 tells the clusters apart (centroids -10, 10), level 1 the side of
    its cluster's centre a point lies on (the residuals' centroids -0.95, 0.95); the two items without a
    vector get code 0 everywhere. (Distinct points: k-means starts from distinct ones, none left empty.)"""
    points = np.array([-11.5, -10.5, -9.5, -8.5, 8.6, 9.6, 10.4, 11.4, 0, 0], np.float32)[:, None]
    present = np.array([True] * 8 + [False] * 2)
    codebooks, codes = residual_kmeans(points, present, levels=2, k=2, seed=0)
    assert codebooks.shape == (2, 2, 1) and codebooks.dtype == np.float32
    np.testing.assert_allclose(np.sort(codebooks[0].ravel()), [-10, 10], atol=1e-5)
    np.testing.assert_allclose(np.sort(codebooks[1].ravel()), [-0.95, 0.95], atol=1e-5)
    assert set(codes[:8].ravel()) <= {1, 2} and (codes[8:] == 0).all()
    cluster, side = codes[:8, 0], codes[:8, 1]
    assert len(set(cluster[:4])) == len(set(cluster[4:])) == 1 and cluster[0] != cluster[4]
    below, above = [0, 1, 4, 5], [2, 3, 6, 7]
    assert len(set(side[below])) == len(set(side[above])) == 1 and side[0] != side[2]
    with pytest.raises(ValueError, match="only 8 items have a vector, fewer than the K = 16"):
        residual_kmeans(points, present, levels=1, k=16, seed=0)


def blobs(n=700, seed=0):
    """(n, 8) vectors with no clear clusters (so seeds find different optima), a tenth without a vector; more
    than K x 256 rows for K = 2, so the seeded sample is exercised too."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.random(n) > 0.1


def test_the_same_seed_gives_the_same_codes_and_another_may_not():
    vectors, present = blobs()
    a, b = residual_kmeans(vectors, present, 3, 2, seed=7), residual_kmeans(vectors, present, 3, 2, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    others = [residual_kmeans(vectors, present, 3, 2, seed=s)[0] for s in (1, 2, 3)]
    assert any(not np.array_equal(a[0], o) for o in others)


def test_assign_reproduces_the_training_codes_whole_and_row_by_row():
    vectors, present = blobs(300)
    codebooks, codes = residual_kmeans(vectors, present, 2, 8, seed=0)
    np.testing.assert_array_equal(assign(vectors, codebooks, present), codes)
    rows = np.flatnonzero(present)[:20]
    single = np.concatenate([assign(vectors[r:r + 1], codebooks) for r in rows])  # a cold item alone
    np.testing.assert_array_equal(single, codes[rows])
    # greedy residual descent, by hand: each level's code is the nearest centroid of what is left
    r = rows[0]
    left = vectors[r].astype(np.float64)
    for level in range(2):
        nearest = int(np.argmin(((codebooks[level] - left) ** 2).sum(1)))
        assert codes[r, level] == nearest + 1
        left = left - codebooks[level][nearest]


def test_families_are_each_normalised_then_concatenated():
    a = Vectors("a", np.array([[0, 0], [3, 4], [0, 0]], np.float16), np.array([False, True, False]))
    b = Vectors("b", np.array([[0], [10], [-2]], np.float32), np.array([False, True, True]))
    matrix, present = quantiser_input([a, b])
    np.testing.assert_allclose(matrix, [[0, 0, 0], [0.6, 0.8, 1], [0, 0, -1]], atol=1e-7)
    assert present.tolist() == [False, True, True]


# ----------------------------------------------------------------------------- end to end (competition folder)

BASE = ["--mm_emb_id", "81", "--semantic_ids", "2", "8", "--device", "cpu", "--maxlen", "20", "--hidden_units", "16",
        "--num_blocks", "1", "--batch_size", "128", "--eval_every", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A training folder and an evaluation folder whose indexer and creative_emb/ also hold COLD, a creative
    training never saw, carrying item COPIED's vector; predict_set.jsonl offers it and one more cold creative
    without any vector."""
    base = tmp_path_factory.mktemp("sid")
    log = taac_synthetic.generate(300, 200, seed=3, mm_ids=("81",))
    train, predict, _ = taac_synthetic.split_predict(log, 30)
    taac_synthetic.write_jsonl_layout(str(base / "train"), train)
    taac_synthetic.write_jsonl_predict(str(base / "eval"), train, predict)
    with open(base / "eval" / "indexer.pkl", "rb") as f:
        indexer = pickle.load(f)
    indexer["i"][COLD] = len(indexer["i"]) + 1
    with open(base / "eval" / "indexer.pkl", "wb") as f:
        pickle.dump(indexer, f)
    emb = base / "eval" / "creative_emb" / "emb_81_32.pkl"
    with open(emb, "rb") as f:
        table = pickle.load(f)
    table[COLD] = log.vectors["81"][COPIED - 1].copy()
    with open(emb, "wb") as f:
        pickle.dump(table, f)
    with open(base / "eval" / "predict_set.jsonl", "a") as f:
        for creative, retrieval in ((COLD, 200), (COLD + 1, 201)):
            f.write(json.dumps({"creative_id": creative, "retrieval_id": retrieval, "features": {"100": 3}}) + "\n")
    return base


@pytest.fixture(scope="module")
def straight(folders):
    """A 2-epoch run (its codes cached in the folders' cache)."""
    run = str(folders / "straight")
    quiet(train_main, BASE + ["--data", str(folders / "train"), "--num_epochs", "2", "--cache_dir",
                              str(folders / "cache"), "--run_dir", run])
    return run


def sid_rows(model):
    """(N + 1, L) the semantic-id codes the model's tower holds (its last L features)."""
    levels = model.config.item_side["semantic_ids"]["levels"]
    count = len(model.config.item_side["features"])
    return torch.cat([getattr(model.item_tower, f"feature_values{i}") for i in range(count - levels, count)], 1)


def test_the_checkpoint_carries_the_quantiser_and_a_cold_creative_gets_the_code_of_its_vector(folders, straight):
    ckpt = checkpoint.load(os.path.join(straight, "ckpt", "best.pt"))
    assert ckpt["model"]["item_tower.semantic_codebooks"].shape == (2, 8, 32)
    spec = ckpt["model_config"]["item_side"]
    assert spec["semantic_ids"] == {"levels": 2, "k": 8, "dim": 32, "vectors": ["mm_81"]}
    assert [f for f in spec["features"] if f["name"].startswith("sid")] == \
        [{"name": "sid0", "vocab_size": 9, "width": 1}, {"name": "sid1", "vocab_size": 9, "width": 1}]
    model = SASRec.from_checkpoint(ckpt)
    codebooks = model.item_tower.semantic_codebooks.numpy()
    # the same k-means, computed here from the folder: the checkpoint rebuilds its codebooks and codes
    data = taac.read_taac(str(folders / "train"), ["81"])
    mm = [v for v in data.item_side.vectors if v.name == "mm_81"]
    expected_books, expected = residual_kmeans(*quantiser_input(mm), 2, 8, seed=42)
    np.testing.assert_array_equal(codebooks, expected_books)
    np.testing.assert_array_equal(sid_rows(model).numpy(), expected)
    assert (expected[1:] > 0).all() and (expected[0] == 0).all()  # every item has a vector; row 0 is padding
    # competition inference runs; the cold creative gets the codes `assign` gives its vector
    out = str(folders / "out")
    quiet(competition.main, ["--ckpt", os.path.join(straight, "ckpt"), "--eval_data", str(folders / "eval"),
                             "--out", out])
    with open(os.path.join(out, "result.json")) as f:
        assert len(json.load(f)["top10s"]) == 30
    config = json.load(open(os.path.join(straight, "ckpt", "config.json")))
    eval_data = competition.read_users(str(folders / "eval"), config)
    creatives, _, candidate_features = competition.read_candidates(str(folders / "eval"))
    _, cand_rows = competition.item_rows(model, {"items": data.item_ids.tolist()}, eval_data, creatives,
                                         candidate_features)
    cold_row, bare_row = cand_rows[list(creatives).index(COLD)], cand_rows[list(creatives).index(COLD + 1)]
    assert cold_row > 200 and bare_row > 200
    vector = np.asarray(mm[0].vectors[COPIED:COPIED + 1])  # float16, as read
    by_assign = assign(quantiser_input([Vectors("mm_81", vector, np.array([True]))])[0], codebooks)
    codes = sid_rows(model).numpy()
    np.testing.assert_array_equal(codes[cold_row], by_assign[0])
    np.testing.assert_array_equal(codes[cold_row], expected[COPIED])  # its vector is item COPIED's
    assert codes[bare_row].tolist() == [0, 0]  # no vector: 'none'
    # --finetune: code embeddings are carried over only under the same codebooks
    assert checkpoint.semantic_tables(SASRec.from_checkpoint(ckpt), ckpt["model"]) == set()
    moved = {**ckpt["model"], "item_tower.semantic_codebooks": ckpt["model"]["item_tower.semantic_codebooks"] + 1}
    n = len(spec["features"])
    assert checkpoint.semantic_tables(SASRec.from_checkpoint(ckpt), moved) == \
        {f"item_tower.feature_emb.{n - 2}.weight", f"item_tower.feature_emb.{n - 1}.weight"}


def test_a_resumed_run_reads_the_cache_and_ends_bit_identical(folders, straight, monkeypatch):
    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran again: the cached codes were not used")
    monkeypatch.setattr(semantic_ids, "residual_kmeans", no_kmeans)
    split = str(folders / "split")
    quiet(train_main, BASE + ["--data", str(folders / "train"), "--num_epochs", "1", "--cache_dir",
                              str(folders / "cache"), "--run_dir", split])
    quiet(train_main, ["--num_epochs", "2", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert a["epoch"] == b["epoch"] == 2 and "item_tower.semantic_codebooks" in a["model"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)


def test_semantic_ids_without_item_vectors_are_refused_in_one_line(folders, tmp_path, capsys):
    fails_with(capsys, train_main, ["--data", "synthetic", "--semantic_ids", "2", "8", "--cache_dir", "",
                                    "--run_dir", str(tmp_path / "r")],
               "--semantic_ids: synthetic gives the items no vectors (--mm_emb_id for competition folders, "
               "--item_emb for logs)")
    fails_with(capsys, train_main, ["--data", str(folders / "train"), "--semantic_ids", "2", "8", "--cache_dir", "",
                                    "--run_dir", str(tmp_path / "r")], "gives the items no vectors")
    fails_with(capsys, train_main, ["--semantic_ids", "2", "1"], "--semantic_ids expects L K: L >= 1 levels of "
                                                                 "K >= 2 centroids, got 2 1")
    fails_with(capsys, train_main, BASE[:4] + ["300", "--data", str(folders / "train"), "--cache_dir", "",
                                               "--run_dir", str(tmp_path / "r")],
               "--semantic_ids 2 300: only 200 items have a vector, fewer than the K = 300 centroids of a level")
    assert not (tmp_path / "r").exists()


def test_a_log_with_item_emb_gets_codes_cached_by_its_vector_file(tmp_path, monkeypatch):
    """Logs: the --item_emb vectors are quantised; the cache key follows the vector file's content."""
    rng = np.random.default_rng(0)
    lines = [f"u{u} " + " ".join(f"i{i}" for i in rng.integers(0, 40, 6)) for u in range(60)]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    ids = np.array([f"i{i}" for i in range(40)])
    np.savez(tmp_path / "emb.npz", ids=ids, vectors=rng.standard_normal((40, 6)).astype(np.float32))
    argv = ["--data", str(tmp_path / "log.txt"), "--item_emb", str(tmp_path / "emb.npz"), "--semantic_ids", "1", "4",
            "--device", "cpu", "--maxlen", "8", "--hidden_units", "8", "--num_blocks", "1", "--num_epochs", "1",
            "--cache_dir", str(tmp_path / "cache")]
    quiet(train_main, argv + ["--run_dir", str(tmp_path / "a")])
    model = SASRec.from_checkpoint(checkpoint.load(str(tmp_path / "a" / "ckpt" / "best.pt")))
    assert model.config.item_side["semantic_ids"]["vectors"] == ["emb"]
    assert set(sid_rows(model)[1:].ravel().tolist()) <= {1, 2, 3, 4}
    calls = []
    real = semantic_ids.residual_kmeans
    monkeypatch.setattr(semantic_ids, "residual_kmeans", lambda *a, **k: calls.append(1) or real(*a, **k))
    quiet(train_main, argv + ["--run_dir", str(tmp_path / "b")])
    assert calls == []  # cached
    np.savez(tmp_path / "emb.npz", ids=ids, vectors=rng.standard_normal((40, 6)).astype(np.float32))
    quiet(train_main, argv + ["--run_dir", str(tmp_path / "c")])
    assert calls == [1]  # other vectors, same log: computed again
    shutil.rmtree(tmp_path / "cache")


def test_finetune_on_the_same_data_carries_the_code_embeddings(folders, straight, tmp_path):
    """Same folder and seed: the same codebooks, so the code embeddings are carried over (none left fresh)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_main(["--finetune", "--state_dict_path", os.path.join(straight, "ckpt"), "--num_epochs", "1",
                    "--run_dir", str(tmp_path / "ft")])
    line = next(s for s in out.getvalue().splitlines() if s.startswith("fine-tuning from"))
    assert "200 of 200 items matched" in line and "left at their initialisation" not in line, line
    tuned = checkpoint.load(str(tmp_path / "ft" / "ckpt" / "last.pt"))["model"]
    before = checkpoint.load(os.path.join(straight, "ckpt", "best.pt"))["model"]
    assert torch.equal(tuned["item_tower.semantic_codebooks"], before["item_tower.semantic_codebooks"])
