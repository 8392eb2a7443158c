"""The negative sampler: uniform / popularity draws, history exclusion, and the batch view a loss gets."""
import numpy as np
import torch

from dataset import Interactions, LeaveOneOut
from objectives.losses import popularity
from objectives.samplers import BatchNegatives, NegativeSampler


def tiny_split():
    """Two users over items 1..6: user 0 trains on [1, 2, 3] (then 4, 5 held out), user 1 on [6] (then 1, 2)."""
    items = np.array([1, 2, 3, 4, 5, 6, 1, 2], np.int32)
    data = Interactions(np.array([0, 5, 8]), items, np.array(["a", "b"]), np.arange(1, 7).astype(str))
    return LeaveOneOut(data)


def test_host_draws_avoid_the_users_training_history_and_the_target():
    split = tiny_split()
    sampler = NegativeSampler(6, history=split)
    users = np.array([0, 1] * 200)
    ids = sampler.draw_host(users, (5,), np.random.default_rng(0), avoid=np.array([4, 2] * 200))
    assert ids.shape == (400, 5) and ids.min() >= 1 and ids.max() <= 6
    assert set(np.unique(ids[users == 0])) == {5, 6}     # not 1, 2, 3 (history) nor 4 (its target)
    assert set(np.unique(ids[users == 1])) == {1, 3, 4, 5}  # not 6 (history) nor 2 (its target)


def test_host_draws_fill_only_the_wanted_entries_and_are_reproducible():
    split = tiny_split()
    sampler = NegativeSampler(6, history=split)
    where = np.array([[False, True, True], [True, True, False]])
    a = sampler.draw_host(np.array([0, 1]), (3,), np.random.default_rng(7), where=where)
    b = sampler.draw_host(np.array([0, 1]), (3,), np.random.default_rng(7), where=where)
    np.testing.assert_array_equal(a, b)
    assert (a[~where] == 0).all() and (a[where] > 0).all()
    assert not split.in_history(np.array([0, 1]), a)[where].any()


def test_popularity_draws_follow_the_counts_and_expected_counts_match():
    counts = np.array([0, 30, 10, 0, 0])  # add-one smoothed: [31, 11, 1, 1] / 44
    sampler = NegativeSampler(4, popularity(counts))
    torch.manual_seed(0)
    ids = sampler.draw(20_000, torch.device("cpu"))
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    torch.testing.assert_close(freq[1:], torch.tensor([31, 11, 1, 1], dtype=torch.float64) / 44, atol=0.01, rtol=0)
    assert freq[0] == 0  # never padding
    torch.testing.assert_close(sampler.expected_counts(8, "cpu"), 8 * popularity(counts))
    uniform = NegativeSampler(4)
    torch.testing.assert_close(uniform.expected_counts(8, "cpu"), torch.tensor([0.0, 2, 2, 2, 2]))
    assert uniform.draw((3, 2), torch.device("cpu")).shape == (3, 2)


def test_batch_negatives_know_the_sequence_of_each_real_position():
    view = BatchNegatives(NegativeSampler(4), rows=torch.tensor([1, 2, 4, 5]), shape=(2, 3))
    assert view.sequence_of_row.tolist() == [0, 0, 1, 1]
