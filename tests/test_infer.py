import csv
import json
import os

import numpy as np
import pytest
import torch

from conftest import write
from eval import infer
from main import main as train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small InfoNCE model trained on the synthetic data (cosine retrieval)."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    train(["--data", "synthetic", "--device", "cpu", "--use_infonce", "--maxlen", "20", "--hidden_units", "32",
           "--num_epochs", "2", "--eval_every", "2", "--run_dir", run_dir])
    return run_dir


def infer_main(run, tmp_path, *flags):
    out = str(tmp_path / "out")
    infer.main(["--ckpt", os.path.join(run, "ckpt"), "--out", out, "--device", "cpu", *flags])
    return out


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_reload_from_saved_config_reproduces_training_metrics(run, tmp_path):
    out = infer_main(run, tmp_path, "--k", "20")
    got = json.load(open(os.path.join(out, "metrics.json")))
    trained = json.load(open(os.path.join(run, "results.json")))["test"]
    for key in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
        assert abs(got[key] - trained[key]) < 1e-9, key
    assert got["users"] == trained["users"] == 4000 and got["similarity"] == "cosine"


def test_outputs_have_raw_ids_embeddings_and_csv(run, tmp_path):
    out = infer_main(run, tmp_path, "--format", "csv", "--k", "5")
    rows = list(csv.DictReader(open(os.path.join(out, "topk.csv"))))
    assert len(rows) == 4000 * 5 and set(rows[0]) == {"user", "rank", "item", "score"}
    first = [r for r in rows if r["user"] == rows[0]["user"]]
    assert [int(r["rank"]) for r in first] == [1, 2, 3, 4, 5]
    assert all(float(a["score"]) >= float(b["score"]) for a, b in zip(first, first[1:], strict=False))
    users, items = np.load(os.path.join(out, "user_emb.npy")), np.load(os.path.join(out, "item_emb.npy"))
    assert users.shape == (4000, 32) and items.shape == (3000, 32)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1, rtol=1e-5)  # L2-normalised
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1, rtol=1e-5)
    assert json.load(open(os.path.join(out, "item_ids.json")))[:3] == ["1", "2", "3"]
    assert len(json.load(open(os.path.join(out, "user_ids.json")))) == 4000


def test_query_file_maps_ids_and_skips_unknown_on_request(run, tmp_path, capsys):
    queries = write(tmp_path, "q.txt", "alice 5 6 7\nbob 999999 12\ncarol nope\n")
    out = infer_main(run, tmp_path, "--queries", queries, "--k", "10", "--skip_unknown")
    printed = capsys.readouterr().out
    assert "2 interactions with 2 item ids unknown" in printed and "1 users with no known item skipped" in printed
    rows = read_jsonl(os.path.join(out, "topk.jsonl"))
    assert [r["user"] for r in rows] == ["alice", "bob"]
    assert not {"5", "6", "7"} & set(rows[0]["items"]) and "12" not in rows[1]["items"]  # history filtered
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # no targets for free-form queries


def test_candidates_subset_and_keep_history(run, tmp_path, capsys):
    cands = write(tmp_path, "c.txt", "5 6 7 8 9 10 11 12 13 14 15 unknown_item\n")
    queries = write(tmp_path, "q.txt", "u 5 6\n")
    out = infer_main(run, tmp_path, "--queries", queries, "--candidates", cands, "--k", "20", "--skip_unknown")
    assert "1 item ids unknown to the checkpoint skipped" in capsys.readouterr().out
    row = read_jsonl(os.path.join(out, "topk.jsonl"))[0]
    assert sorted(row["items"], key=int) == [str(i) for i in range(7, 16)]  # 11 candidates - 2 seen, k > 9
    out = infer_main(run, tmp_path, "--queries", queries, "--candidates", cands, "--k", "20", "--keep_history",
                     "--skip_unknown")
    assert len(read_jsonl(os.path.join(out, "topk.jsonl"))[0]["items"]) == 11


def test_contradicting_flag_and_bad_checkpoint_dir(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        infer_main(run, tmp_path, "--hidden_units", "64")
    assert e.value.code == 2
    assert "--hidden_units 64 contradicts the checkpoint's saved config (hidden_units = 32)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        infer.main(["--ckpt", str(tmp_path)])
    assert e.value.code == 2 and "missing config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a model trained without --next_action is asked for no action
        infer_main(run, tmp_path, "--predict_action", "2")
    assert e.value.code == 2 and "trained without --next_action" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_faiss_device_falls_back_to_cpu_cleanly(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "faiss_gpu_available", lambda: False)
    infer_main(run, tmp_path, "--faiss_device", "auto")
    assert "on CPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        infer_main(run, tmp_path, "--faiss_device", "gpu")
    assert e.value.code == 2 and "no GPU support" in capsys.readouterr().err


@pytest.mark.parametrize("filtered, subset", [(False, False), (True, False), (True, True)])
def test_exact_faiss_matches_torch_topk(filtered, subset):
    rng = np.random.default_rng(0)
    catalogue = rng.standard_normal((500, 16)).astype(np.float32)
    users = rng.standard_normal((64, 16)).astype(np.float32)
    cands = np.sort(rng.choice(500, size=200, replace=False)) if subset else np.arange(500)
    history = [rng.choice(500, size=rng.integers(0, 30), replace=False) for _ in range(64)]
    position = np.full(500, -1)
    position[cands] = np.arange(len(cands))
    exclude = [position[h][position[h] >= 0] for h in history] if filtered else None
    ids, scores = infer.search(infer.build_index(catalogue[cands], "flat", "cpu", verbose=False), users, 10,
                               exclude, 16)
    full = torch.from_numpy(users) @ torch.from_numpy(catalogue).T
    if filtered:
        for r, h in enumerate(history):
            full[r, torch.from_numpy(h)] = float("-inf")
    outside = torch.ones(500, dtype=torch.bool)
    outside[torch.from_numpy(cands)] = False
    full[:, outside] = float("-inf")
    want_scores, want_ids = full.topk(10, dim=1)
    np.testing.assert_array_equal(cands[ids], want_ids.numpy())  # index positions -> catalogue rows
    np.testing.assert_allclose(scores, want_scores.numpy(), atol=1e-5)


def test_ann_indexes_find_most_exact_neighbours():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20, 16))
    items = (centers[rng.integers(20, size=4000)] + 0.3 * rng.standard_normal((4000, 16))).astype(np.float32)
    users = (centers[rng.integers(20, size=100)] + 0.3 * rng.standard_normal((100, 16))).astype(np.float32)
    exact, _ = infer.search(infer.build_index(items, "flat", "cpu", verbose=False), users, 10)
    for kind in ("ivf", "hnsw"):
        approx, _ = infer.search(infer.build_index(items, kind, "cpu", nprobe=8, verbose=False), users, 10)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
        assert recall > 0.9, kind


def test_separate_output_table_round_trips_through_the_checkpoint(tmp_path):
    """A model trained with --output_emb separate is rebuilt from its saved config alone: inference gets the
    training run's test metrics and exports the output table's rows as item vectors."""
    run_dir = str(tmp_path / "run")
    train(["--data", "synthetic", "--device", "cpu", "--loss", "gbce", "--output_emb", "separate", "--maxlen", "20",
           "--hidden_units", "16", "--num_negatives", "32", "--num_epochs", "1", "--run_dir", run_dir])
    out = infer_main(run_dir, tmp_path)
    got = json.load(open(os.path.join(out, "metrics.json")))
    trained = json.load(open(os.path.join(run_dir, "results.json")))
    assert abs(got["NDCG@10"] - trained["test"]["NDCG@10"]) < 1e-9
    weights = torch.load(os.path.join(run_dir, "ckpt", "best.pt"), weights_only=True)["model"]
    table = weights["output_tower.id_emb.weight"][1:].numpy()
    np.testing.assert_allclose(np.load(os.path.join(out, "item_emb.npy")), table)
