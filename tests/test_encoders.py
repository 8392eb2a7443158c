"""--encoder hstu and --attn_bias position,time: each piece against hand-computed values, causality and padding,
exact resume, and a checkpoint that rebuilds its encoder in every consumer with no flag."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from config import build_config
from dataset import Batch
from encoders.bias import RelativeBias, attention_context, time_buckets
from encoders.hstu import HSTULayer
from encoders.sasrec import CausalSelfAttention
from eval import infer
from main import main as train
from model import SASRec
from readers.logs import make_synthetic

EPS = 1e-6


def silu(v):
    return v / (1 + math.exp(-v))


def layer_norm(row):
    mean = sum(row) / len(row)
    var = sum((v - mean) ** 2 for v in row) / len(row)
    return [(v - mean) / math.sqrt(var + EPS) for v in row]


def test_time_buckets_hand_computed():
    # floor(ln(max(|dt|, 1)) / 0.301), at most 128
    query = torch.tensor([[10, 1000, 100_000, 5, 2 ** 62]])
    key = torch.tensor([[0, 10, 1000, 5, 0]])
    buckets = time_buckets(query, key)[0]
    assert buckets[0, 0] == 7  # ln 10 = 2.3026 -> 7.65
    assert buckets[1, 0] == 22 and buckets[1, 1] == 22  # ln 1000 = 6.9078 -> 22.95; ln 990 -> 22.92
    assert buckets[2, 0] == 38 and buckets[2, 2] == 38  # ln 1e5 = 11.5129 -> 38.25; ln 99000 -> 38.22
    assert buckets[3, 3] == 0  # a gap of 0 s counts as 1 s: ln 1 = 0
    assert buckets[4, 0] == 128  # ln 2^62 = 42.98 -> 142.8, capped


def test_relative_bias_hand_computed_on_one_sequence_of_three():
    bias = RelativeBias(("position", "time"), positions=4)
    with torch.no_grad():
        bias.position.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # offsets i - j = 0, 1, 2, 3
        bias.time.copy_(torch.arange(129, dtype=torch.float32) / 100)  # bucket b -> b / 100
    event_times, next_times = torch.tensor([[0, 10, 1000]]), torch.tensor([[10, 1000, 100_000]])
    context = attention_context(torch.ones(1, 3, dtype=torch.bool), next_times, event_times, with_offsets=True)
    got = bias(context)[0, 0]
    # time buckets (query i's next time against key j's time): row 0: |10 - 0| -> 7; row 1: 22, 22;
    # row 2: 38, 38, 38 (100000 - 0, -10, -1000); above the diagonal (masked later): |t_next(i) - t_j|
    expected = torch.tensor([[0.1 + 0.07, 0.1 + 0.00, 0.1 + 0.22],  # (0, 1): |10 - 10| = 0 -> 0; (0, 2): 990 -> 22
                             [0.2 + 0.22, 0.1 + 0.22, 0.1 + 0.00],  # (1, 2): |1000 - 1000| -> 0
                             [0.3 + 0.38, 0.2 + 0.38, 0.1 + 0.38]])
    torch.testing.assert_close(got, expected)
    only_position = RelativeBias(("position",), positions=4)
    with torch.no_grad():
        only_position.position.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(only_position(context)[0, 0], torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.1, 0.1],
                                                                           [0.3, 0.2, 0.1]]))


def hstu_layer_by_hand():
    """D 2, one head; W_uvqk reads only the normalised input's first coordinate z: u = (z, z), v = q = k = (z, 0)
    before SiLU; W_o the identity, b_o 0."""
    layer = HSTULayer(2, 1, 0.0, positions=4)
    with torch.no_grad():
        layer.uvqk.weight.copy_(torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 0], [1, 0], [0, 0], [1, 0], [0, 0]]))
        layer.out.weight.copy_(torch.eye(2))
        layer.out.bias.zero_()
    return layer


def test_hstu_layer_first_position_hand_computed():
    layer = hstu_layer_by_hand()
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.0], [0.0, 2.0]]])
    y = layer(x, attention_context(torch.ones(1, 3, dtype=torch.bool)))
    # position 0 sees only itself. LN([1, -1]) = (z, -z), z = 1 / sqrt(1 + 1e-6); s = SiLU(z)
    z = 1 / math.sqrt(1 + EPS)
    s = silu(z)
    a = silu(s * s) / 4  # A(0, 0) = SiLU(q . k) / n, n = 4
    av = [a * s, 0.0]  # A V, v = (s, SiLU(0) = 0)
    gate = layer_norm(av)  # LN over D: (0.99947, -0.99947)
    expected = [1 + gate[0] * s, -1 + gate[1] * s]  # x + W_o (LN(AV) * u), u = (s, s)
    torch.testing.assert_close(y[0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert abs(expected[0] - 1.73068) < 1e-4


def test_hstu_layer_matches_the_equations_written_as_loops():
    """Every position of a 1 x 3 sequence with both biases, against the docstring's equations in plain Python
    (the last query attends all three keys; each term SiLU(q . k + rab) / n)."""
    torch.manual_seed(0)
    bias = RelativeBias(("position", "time"), positions=4)
    layer = HSTULayer(4, 2, 0.0, positions=4, bias=bias)
    x = torch.randn(1, 3, 4)
    event_times, next_times = torch.tensor([[0, 10, 1000]]), torch.tensor([[10, 1000, 100_000]])
    context = attention_context(torch.ones(1, 3, dtype=torch.bool), next_times, event_times, with_offsets=True)
    got = layer(x, context)[0]
    W, Wo, bo = layer.uvqk.weight.tolist(), layer.out.weight.tolist(), layer.out.bias.tolist()
    rab = bias(context)[0, 0].tolist()
    rows = x[0].tolist()
    proj = [[silu(sum(w * v for w, v in zip(W[o], layer_norm(r), strict=True))) for o in range(16)] for r in rows]
    u, v, q, k = ([p[4 * c:4 * c + 4] for p in proj] for c in range(4))
    for i in range(3):
        av = []
        for h in range(2):
            d = slice(2 * h, 2 * h + 2)
            logits = [sum(a * b for a, b in zip(q[i][d], k[j][d], strict=True)) + rab[i][j] for j in range(i + 1)]
            weights = [silu(logit) / 4 for logit in logits]
            av += [sum(weights[j] * v[j][d][c] for j in range(i + 1)) for c in range(2)]
        gated = [g * w for g, w in zip(layer_norm(av), u[i], strict=True)]
        expected = [rows[i][o] + bo[o] + sum(Wo[o][c] * gated[c] for c in range(4)) for o in range(4)]
        torch.testing.assert_close(got[i], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_sasrec_attention_with_a_bias_is_softmax_of_scaled_logits_plus_bias():
    torch.manual_seed(1)
    bias = RelativeBias(("position",), positions=4)
    attn = CausalSelfAttention(4, 1, bias)
    x = torch.randn(1, 3, 4)
    context = attention_context(torch.ones(1, 3, dtype=torch.bool), with_offsets=True)
    q, k, v = attn.qkv(x).split(4, -1)
    logits = q @ k.transpose(-1, -2) / 2 + bias(context)[0]  # 1 / sqrt(4)
    logits = logits.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(attn(x, context), attn.proj(logits.softmax(-1) @ v))


def timed_batch(items, times, next_times=None):
    """A Batch of one left-padded history (item 0 = padding) with its event times and prediction times (by
    default each event's next one; the last event's target comes 7 s after it)."""
    inputs = torch.tensor([items])
    next_times = next_times or times[1:] + [times[-1] + 7]
    return Batch(inputs, torch.zeros_like(inputs), torch.tensor([0]), torch.zeros(0, dtype=torch.long),
                 event_times=torch.tensor([times]), next_times=torch.tensor([next_times]))


@pytest.mark.parametrize("encoder, bias", [("sasrec", "position,time"), ("hstu", ""), ("hstu", "position,time")])
def test_no_state_sees_the_future_or_the_padding(encoder, bias):
    config = build_config(["--encoder", encoder, "--attn_bias", bias, "--hidden_units", "8", "--num_heads", "2",
                           "--maxlen", "6", "--dropout_rate", "0"]).model
    torch.manual_seed(0)
    model = SASRec(dataclasses.replace(config, num_items=20)).eval()
    times = [0, 0, 100, 200, 300, 400]
    base = model.encode(timed_batch([0, 0, 3, 4, 5, 6], times))
    assert base[0, :2].eq(0).all() and base[0, 2:].ne(0).any()
    # later items, and the time of an event two ahead (position 3 predicts the event at 300 s: that time is
    # its prediction time, an input by design, so the test moves the one after it)
    later_items = model.encode(timed_batch([0, 0, 3, 4, 9, 11], times))
    later_time = model.encode(timed_batch([0, 0, 3, 4, 5, 6], [0, 0, 100, 200, 300, 999]))
    for changed in (later_items, later_time):
        torch.testing.assert_close(changed[0, :4], base[0, :4], rtol=0, atol=0)
    assert not torch.equal(later_items[0, 4:], base[0, 4:])
    assert torch.equal(later_time[0, 4], base[0, 4]) == ("time" not in bias)
    padding_times = model.encode(timed_batch([0, 0, 3, 4, 5, 6], [77, 99, 100, 200, 300, 400],
                                             next_times=[88, 11, 200, 300, 400, 407]))
    torch.testing.assert_close(padding_times, base, rtol=0, atol=0)


def timed_log(tmp_path, users=150, items=60, seed=0):
    """A CSV log with timestamps (seconds, gaps from a minute to weeks) on the synthetic log's sequences."""
    data = make_synthetic(num_users=users, num_items=items, num_topics=4, seed=seed)
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for u in range(users):
        sequence = data.items[data.offsets[u]:data.offsets[u + 1]]
        times = 1_600_000_000 + np.cumsum(rng.integers(60, 3_000_000, len(sequence)))
        lines += [f"u{u},i{item},{t}" for item, t in zip(sequence, times, strict=True)]
    path = tmp_path / "timed.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


HSTU = ["--encoder", "hstu", "--attn_bias", "position,time", "--device", "cpu", "--maxlen", "12", "--hidden_units",
        "16", "--num_heads", "2", "--batch_size", "64", "--eval_every", "1", "--cache_dir", ""]


def test_hstu_resumes_exactly_and_every_consumer_rebuilds_it_from_the_checkpoint(tmp_path):
    data = timed_log(tmp_path)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(HSTU + ["--data", data, "--num_epochs", "3", "--run_dir", straight])
    train(HSTU + ["--data", data, "--num_epochs", "2", "--run_dir", split])
    train(["--num_epochs", "3", "--state_dict_path", os.path.join(split, "ckpt")])
    a, b = (torch.load(os.path.join(run, "ckpt", "last.pt"), weights_only=True) for run in (straight, split))
    assert a["step"] == b["step"] and any(".rel_bias.time" in k for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    out = str(tmp_path / "out")
    infer.main(["--ckpt", os.path.join(straight, "ckpt"), "--out", out, "--device", "cpu", "--k", "10"])
    got = json.load(open(os.path.join(out, "metrics.json")))
    trained = json.load(open(os.path.join(straight, "results.json")))["test"]
    assert abs(got["NDCG@10"] - trained["NDCG@10"]) < 1e-9 and trained["NDCG@10"] > 0


def test_a_time_bias_needs_timestamps_and_an_unknown_bias_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train(["--data", "synthetic", "--attn_bias", "time", "--num_epochs", "1", "--run_dir", str(tmp_path / "r")])
    assert exit_.value.code == 2 and not (tmp_path / "r").exists()
    assert capsys.readouterr().err.strip() == ("error: --attn_bias time: synthetic has no timestamps (a time column, "
                                               "or a competition folder); use --attn_bias position")
    with pytest.raises(SystemExit) as exit_:
        train(["--data", "synthetic", "--attn_bias", "position,distance", "--run_dir", str(tmp_path / "r")])
    assert exit_.value.code == 2
    assert "--attn_bias 'position,distance': unknown kind 'distance'" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--encoder", "sasrec", "--attn_bias", "position,time"],
                                   ["--encoder", "sasrec", "--no-norm_first", "--num_heads", "1"],
                                   ["--encoder", "hstu", "--attn_bias", "position,time"],
                                   ["--encoder", "hstu", "--user_features", "token"],
                                   ["--encoder", "sasrec", "--user_features", "add"]])
def test_user_vectors_from_the_last_position_alone_match_the_full_encoding(flags):
    """user_embeddings computes only the last position in the last layer: the same vectors as every position's."""
    config = build_config([*flags, "--hidden_units", "8", "--num_heads", "2", "--maxlen", "6", "--dropout_rate", "0",
                           "--num_blocks", "2"]).model
    users = {"features": [{"vocab_size": 5, "width": 2}]}
    torch.manual_seed(0)
    model = SASRec(dataclasses.replace(config, num_items=20, user_side=users)).eval()
    batch = timed_batch([0, 0, 3, 4, 5, 6], [0, 0, 100, 200, 300, 400])
    batch = dataclasses.replace(batch, inputs=torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]]),
                                event_times=batch.event_times.repeat(2, 1), next_times=batch.next_times.repeat(2, 1),
                                user_features=torch.tensor([[1, 2], [3, 0]]))
    full = model.encode(batch)[:, -1]
    assert model.encode(batch, last_only=True).shape == (2, 1, 8)
    torch.testing.assert_close(model.user_embeddings(batch), full, rtol=1e-6, atol=1e-6)
    assert not torch.equal(full[0], full[1])
