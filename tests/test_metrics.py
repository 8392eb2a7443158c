import math

import numpy as np
import torch

from config import ModelConfig
from conftest import write
from dataset import LeaveOneOut, left_padded
from eval.infer import padded_histories
from eval.metrics import MISS, embed_users, evaluate, full_ranks, metrics_from_ranks, model_scorer, popularity_scorer
from model import SASRec
from readers.logs import load_interactions


def test_metrics_from_known_ranks():
    m = metrics_from_ranks([0, 1, 4, 30])
    assert m["HR@1"] == 0.25 and m["HR@5"] == 0.75 and m["HR@10"] == 0.75 and m["HR@20"] == 0.75
    assert math.isclose(m["NDCG@5"], (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert math.isclose(m["NDCG@20"], m["NDCG@5"])
    assert math.isclose(m["MRR"], (1 + 1 / 2 + 1 / 5 + 1 / 31) / 4)


def test_full_ranks_excludes_padding_history_and_counts_ties_against_target():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9],    # target 3 (0.3): items 2 and 4 beat it
                           [9.0, 0.7, 0.7, 0.2, 0.1]])   # target 1 (0.7) ties with item 2
    ranks = full_ranks(scores.clone(), torch.tensor([3, 1]))
    assert ranks.tolist() == [2, 1]
    # excluding item 4 for user 0 and item 2 for user 1 removes those competitors
    ranks = full_ranks(scores.clone(), torch.tensor([3, 1]), torch.tensor([0, 1]), torch.tensor([4, 2]))
    assert ranks.tolist() == [1, 0]
    # a target that is also in the (filtered) history cannot be recommended: a miss at every cut-off
    assert full_ranks(scores.clone(), torch.tensor([4, 1]), torch.tensor([0]), torch.tensor([4])).tolist() == [MISS, 1]


def test_evaluate_with_oracle_and_popularity(tmp_path):
    # 3 users; item 1 is the most popular training item and item 4 the test target of two users.
    data = load_interactions(write(tmp_path, "log.txt", "1 1 2 3 4\n2 1 3 2 4\n3 1 5 2 1\n"))
    split = LeaveOneOut(data)
    _, _, _, targets = split.eval_arrays("test")

    def oracle(users, ends, lengths):  # puts each user's test target first
        scores = torch.zeros(len(ends), data.num_items + 1)
        scores[torch.arange(len(ends)), torch.from_numpy(data.items[ends].astype(np.int64))] = 1.0
        return scores
    m = evaluate(oracle, split, "test", exclude_history=False, sampled=True)
    assert m["HR@1"] == 1.0 and m["NDCG@10"] == 1.0 and m["sampled_HR@1"] == 1.0 and m["users"] == 3
    # user 3's test target (item 1) is already in its history: filtered, so even the oracle misses it
    m = evaluate(oracle, split, "test")
    assert m["HR@1"] == m["HR@20"] == 2 / 3
    # popularity before test: counts {1: 3, 2: 2, 3: 2, 5: 1} (+ valid targets 3, 2, 2)
    pop = evaluate(popularity_scorer(split.item_counts("test")), split, "test", exclude_history=False)
    # user 1 target 4 (count 0): beaten by 1, 2, 3, 5 -> rank 4; user 2 the same; user 3 target 1 -> rank 0
    assert pop["HR@1"] == 1 / 3 and math.isclose(pop["MRR"], (1 / 5 + 1 / 5 + 1) / 3)
    # excluding history, users 1 and 2 (history 1, 2, 3) only have item 5 above item 4; user 3 misses
    pop = evaluate(popularity_scorer(split.item_counts("test")), split, "test")
    assert pop["HR@1"] == 0 and pop["HR@5"] == 2 / 3
    assert math.isclose(pop["NDCG@5"], (2 / math.log2(3)) / 3)


def test_length_sorted_batches_give_each_user_its_own_vector_and_rank(tmp_path):
    # 7 users of lengths 3..9 in shuffled order, batched 2 at a time by length: every vector must land on
    # its own user, equal to that user's history encoded alone, and the metrics equal one-user batches'.
    rng = np.random.default_rng(0)
    lines = [" ".join([str(u)] + [str(i) for i in rng.integers(1, 12, size=n)]) for u, n in
             enumerate([9, 3, 7, 4, 8, 5, 6], start=1)]
    data = load_interactions(write(tmp_path, "log.txt", "\n".join(lines) + "\n"))
    split = LeaveOneOut(data)
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=data.num_items, maxlen=6, hidden_units=8, num_blocks=2, num_heads=2)).eval()
    ends, lengths = data.offsets[1:], data.lengths
    vectors = embed_users(model, padded_histories(data.items, ends), lengths, torch.device("cpu"), False, 2)
    for u in range(data.num_users):
        n = min(lengths[u], 6)
        alone = torch.from_numpy(left_padded(data.items, ends[u:u + 1], np.array([n]), n))
        np.testing.assert_allclose(vectors[u], model.user_embeddings(alone)[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    score = model_scorer(model, data, torch.device("cpu"))
    for which in ("valid", "test"):  # each user scored alone, the history excluded by hand
        users, h_ends, h_len, targets = split.eval_arrays(which)
        ranks = []
        for u, e, n, t in zip(users, h_ends, h_len, targets, strict=True):
            s = score(np.array([u]), np.array([e]), np.array([n]))[0]
            s[0] = s[data.items[e - n:e]] = float("-inf")
            ranks.append(int((s >= s[t]).sum()) - 1 if t not in data.items[e - n:e] else MISS)
        batched, by_hand = evaluate(score, split, which), metrics_from_ranks(ranks)
        for k in by_hand:
            assert math.isclose(batched[k], by_hand[k], rel_tol=1e-9), (which, k)
