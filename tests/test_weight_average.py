"""--ema_decay: the averaged weights follow the stated recurrence, share the buffers, are what a run
validates, saves as "model" and infers with, and a resumed run repeats the straight one."""
import json
import os

import pytest
import torch
import torch.nn as nn

from main import main
from training.weight_average import WeightAverage

TINY = ["--data", "synthetic", "--device", "cpu", "--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1",
        "--batch_size", "256", "--eval_every", "1", "--ema_decay", "0.9"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("table", torch.arange(3))


def test_average_follows_the_warmed_up_recurrence_and_shares_buffers():
    model = Tiny()
    average = WeightAverage(model, decay=0.25)
    assert [average.step_decay(s) for s in (1, 2, 3)] == [2 / 11, 0.25, 0.25]  # warm-up (1 + t) / (10 + t), then 0.25
    for step, value in enumerate(([3.0, 0.0], [5.0, 4.0], [-1.0, 1.0]), start=1):
        with torch.no_grad():
            model.weight.copy_(torch.tensor(value))
        average.update(step)
    # by hand: [1, 2] -> [29/11, 4/11] -> [194/44, 34/11] -> [62/176, 67/44]
    expected = torch.tensor([62 / 176, 67 / 44])
    torch.testing.assert_close(average.model.weight, expected)
    assert average.model.table.data_ptr() == model.table.data_ptr()  # one copy of the side tables
    assert not average.model.weight.requires_grad and not average.model.training


def test_ema_run_saves_the_average_resumes_exactly_and_infers_with_it(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(TINY + ["--num_epochs", "3", "--run_dir", straight])
    main(TINY + ["--num_epochs", "2", "--run_dir", split])
    main(["--num_epochs", "3", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    for key in ("model", "online_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
    name = "item_tower.id_emb.weight"
    assert not torch.equal(a["model"][name], a["online_model"][name])  # the average is not the online weights
    log = [json.loads(line) for line in open(os.path.join(straight, "logs", "train.log"))]
    best = torch.load(os.path.join(straight, "ckpt", "best.pt"), weights_only=True)
    # Validation NDCG@10 rises every epoch of this run (about 0.005, 0.013, 0.019), so the last epoch is the best
    # and best.pt must hold the same average as last.pt: asserted, not assumed.
    assert best["epoch"] == max(log, key=lambda r: r["valid"]["NDCG@10"])["epoch"] == 3
    for key in a["model"]:
        torch.testing.assert_close(best["model"][key], a["model"][key], rtol=0, atol=0)
    main(["--state_dict_path", os.path.join(straight, "ckpt"), "--inference_only"])
    trained = json.load(open(os.path.join(straight, "results.json")))
    evaluated = json.load(open(os.path.join(straight, "eval_results.json")))
    assert evaluated["test"] == trained["test"]  # the final report and inference both score best.pt's average


def test_validation_scores_the_average_not_the_online_weights(tmp_path):
    """The validation logged at the last epoch equals the metric of last.pt's "model" (the average)."""
    run = str(tmp_path / "run")
    main(TINY + ["--num_epochs", "2", "--run_dir", run])
    log = [json.loads(line) for line in open(os.path.join(run, "logs", "train.log"))]
    main(["--state_dict_path", os.path.join(run, "ckpt", "last.pt"), "--inference_only"])
    evaluated = json.load(open(os.path.join(run, "eval_results.json")))
    assert evaluated["valid"]["NDCG@10"] == pytest.approx(log[-1]["valid"]["NDCG@10"], abs=1e-12)
