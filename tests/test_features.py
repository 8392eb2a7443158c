import json
import os

import numpy as np
import pytest
import torch

from config import build_config
from conftest import TINY, write
from eval import infer
from main import main
from model import ItemTower
from readers.features import PAD, UNKNOWN, load_side_info, read_attributes

ITEMS = ["10", "20", "30", "40"]  # raw ids of items 1..4


def test_json_attributes_are_coded_per_item_with_padding_and_unknown(tmp_path):
    path = write(tmp_path, "attrs.json", json.dumps({"10": [7, 8], "30": ["x"], "99": [7]}))
    [feature] = read_attributes(path, {raw: i + 1 for i, raw in enumerate(ITEMS)})
    # values sorted as strings: '7' -> 2, '8' -> 3, 'x' -> 4; item 99 is not in the catalogue and is ignored
    assert feature.vocab_size == 5
    assert feature.values.tolist() == [[PAD, PAD], [2, 3], [UNKNOWN, PAD], [4, PAD], [UNKNOWN, PAD]]


def test_delimited_attributes_one_feature_per_column(tmp_path):
    path = write(tmp_path, "items.csv", "item_id,brand,tags\n10,acme,a|b|c\n20,,b\n40,zeta,\n")
    brand, tags = read_attributes(path, {raw: i + 1 for i, raw in enumerate(ITEMS)})
    assert (brand.name, tags.name) == ("brand", "tags")
    assert brand.values[:, 0].tolist() == [PAD, 2, UNKNOWN, UNKNOWN, 3]  # '' and an unlisted item -> unknown
    assert tags.values.tolist() == [[0, 0, 0], [2, 3, 4], [3, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_multi_valued_pooling_ignores_padding_slots():
    spec = {"features": [{"name": "tags", "vocab_size": 5, "width": 3}], "vectors": []}
    side = ItemTower(2, 4, spec, use_id=False)
    with torch.no_grad():
        side.feature_values0.copy_(torch.tensor([[0, 0, 0], [2, 3, 0], [2, 0, 0]]))
        side.feature_emb[0].weight[0] = 100.0  # were padding pooled, it would show
    side.fuse = torch.nn.Identity()
    out = side(torch.tensor([1, 2]))
    emb = side.feature_emb[0].weight
    torch.testing.assert_close(out[0], (emb[2] + emb[3]) / 2)  # the mean of two values, not of three slots
    torch.testing.assert_close(out[1], emb[2])
    assert side(torch.tensor([0])).abs().sum() == 0  # padding item -> zero vector


def test_pretrained_vectors_projected_and_missing_items_get_the_learned_default(tmp_path):
    np.save(tmp_path / "mm.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    (tmp_path / "mm.ids.txt").write_text("30\n10\n")
    info = load_side_info(ITEMS, vector_files=[str(tmp_path / "mm.npy")])
    assert info.spec() == {"features": [], "vectors": [{"name": "mm", "dim": 3}]}
    side = ItemTower(4, 2, info.spec(), use_id=False)
    side.load_arrays(info)
    side.fuse = torch.nn.Identity()
    out = side(torch.tensor([1, 2, 3]))
    proj = side.vector_proj[0]
    torch.testing.assert_close(out[0], proj(torch.tensor([3.0, 4.0, 5.0])))  # item '10' is the file's 2nd row
    torch.testing.assert_close(out[1], side.vector_default[0])  # item '20' has no vector
    torch.testing.assert_close(out[2], proj(torch.tensor([0.0, 1.0, 2.0])))


def test_checkpoint_with_side_information_reloads_in_infer_with_identical_scores(tmp_path):
    # synthetic items 1..3000: a two-column attribute file and 8-d pretrained vectors for half of them
    rng = np.random.default_rng(0)
    rows = "".join(f"{i},{i % 40},{i % 7}|{i % 11}\n" for i in range(1, 3001))
    attrs = write(tmp_path, "items.csv", "item_id,topic,tags\n" + rows)
    np.savez(tmp_path / "vecs.npz", ids=np.arange(1, 1501).astype(str), vectors=rng.normal(size=(1500, 8)))
    run = str(tmp_path / "run")
    main(["--data", "synthetic", "--device", "cpu", "--maxlen", "20", "--hidden_units", "16", "--num_epochs", "1",
          "--use_infonce", "--item_features", attrs, "--item_emb", str(tmp_path / "vecs.npz"), "--run_dir", run])
    config = json.load(open(os.path.join(run, "ckpt", "config.json")))
    assert [f["name"] for f in config["item_side"]["features"]] == ["topic", "tags"]
    assert config["item_side"]["vectors"] == [{"name": "vecs", "dim": 8}]
    os.remove(attrs)  # inference needs no feature file: the arrays travel in the checkpoint
    out = str(tmp_path / "out")
    infer.main(["--ckpt", os.path.join(run, "ckpt"), "--out", out, "--device", "cpu", "--k", "20"])
    got = json.load(open(os.path.join(out, "metrics.json")))
    trained = json.load(open(os.path.join(run, "results.json")))["test"]
    for key in ("HR@10", "NDCG@10", "NDCG@20"):
        assert abs(got[key] - trained[key]) < 1e-9, key


def test_no_item_id_needs_side_information(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", "synthetic", "--no_item_id"])
    assert e.value.code == 2 and "--no_item_id needs --item_features or --item_emb" in capsys.readouterr().err


def test_no_item_id_takes_a_competition_folders_own_features(tmp_path, capsys):
    """A competition folder brings its item features (all by default) and --mm_emb_id vectors: --no_item_id is
    refused there only when both are turned off."""
    assert build_config(["--data", str(tmp_path), "--no_item_id"]).model.no_item_id
    assert build_config(["--data", str(tmp_path), "--no_item_id", "--item_feature_ids", "--mm_emb_id", "81"])
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--no_item_id", "--item_feature_ids"])
    assert e.value.code == 2 and "--no_item_id needs" in capsys.readouterr().err


def test_separate_output_table_refuses_side_information(tmp_path, capsys):
    attrs = write(tmp_path, "items.json", '{"1": ["a"]}')
    with pytest.raises(SystemExit) as e:
        main(["--data", "synthetic", "--output_emb", "separate", "--item_features", attrs])
    assert e.value.code == 2 and "--output_emb separate is for id embeddings only" in capsys.readouterr().err


def test_item_id_dropout_makes_a_dropped_item_what_an_unknown_creative_is():
    """--item_id_dropout: inside a training step a dropped item's vector is exactly that of the same item with no
    id embedding (as extend() embeds a creative training never saw), a kept item's is unchanged (no rescaling);
    one draw per step; outside a step and in evaluation nothing is dropped."""
    torch.manual_seed(0)
    spec = {"features": [{"name": "f", "vocab_size": 9, "width": 1}], "vectors": []}
    tower = ItemTower(400, 8, spec, id_row_dropout=0.25).train()
    with torch.no_grad():
        tower.feature_values0.copy_(torch.arange(401)[:, None] % 9)
    ids = torch.arange(1, 401)
    full = tower(ids)
    with torch.no_grad():
        without_ids = tower.fuse(torch.cat([torch.zeros(400, 8), *tower.side_parts(ids)], -1))
    with tower.dropout_step():
        stepped = tower(ids)
        torch.testing.assert_close(tower(ids[:5]), stepped[:5])  # one draw for the whole step
    dropped = (stepped - without_ids).abs().amax(1) < 1e-6
    assert 0.15 < dropped.float().mean() < 0.35
    torch.testing.assert_close(stepped[~dropped], full[~dropped])
    with tower.dropout_step():
        assert not torch.equal((tower(ids) - without_ids).abs().amax(1) < 1e-6, dropped)
    tower.eval()
    with tower.dropout_step():
        torch.testing.assert_close(tower(ids), full)


def test_item_id_dropout_resumes_exactly(tmp_path):
    """Its row draws come from torch's generator, whose state the checkpoint keeps: 1 + 1 epochs equal 2."""
    attrs = write(tmp_path, "items.csv", "item_id,topic\n" + "".join(f"{i},{i % 40}\n" for i in range(1, 3001)))
    flags = TINY + ["--item_features", attrs, "--item_id_dropout", "0.3"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(flags + ["--num_epochs", "2", "--run_dir", straight])
    main(flags + ["--num_epochs", "1", "--run_dir", split])
    main(["--num_epochs", "2", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True)["model"] for run in (straight, split))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
