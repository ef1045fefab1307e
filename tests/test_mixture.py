"""The deterministic data mixture: repeats, seeded order, rows of a batch and exact resume."""

import collections

import numpy as np
import pytest

from persllm_jax.data import Mixture, batch_rows, epoch_order


def _counts(order: np.ndarray) -> collections.Counter:
    return collections.Counter(map(tuple, order.tolist()))


def test_integer_repeats_give_each_example_that_many_times():
    order = epoch_order([4, 3], [5, 1], seed=0, epoch=0)
    assert order.shape == (23, 2)
    counts = _counts(order)
    assert all(counts[(0, i)] == 5 for i in range(4)) and all(counts[(1, i)] == 1 for i in range(3))
    assert len(counts) == 7
    assert order[:, 0].tolist() != sorted(order[:, 0].tolist())  # shuffled across sources


def test_fractional_repeats_take_a_seeded_subset():
    mixture = Mixture((10, 7), (1.5, 0.3), seed=3)
    assert mixture.epoch_size == 10 + 5 + 2  # 0.3 * 7 = 2.1 rounds to 2
    orders = [mixture.epoch_order(e) for e in range(4)]
    for order in orders:
        counts = _counts(order)
        first = [counts[(0, i)] for i in range(10)]
        assert sorted(first) == [1] * 5 + [2] * 5
        second = [counts[(1, i)] for i in range(7)]
        assert sorted(second) == [0] * 5 + [1] * 2
    # the subset is drawn again each epoch (so over epochs the whole source is used), reproducibly
    subsets = {tuple(sorted(i for s, i in order.tolist() if s == 1)) for order in orders}
    assert len(subsets) > 1
    np.testing.assert_array_equal(Mixture((10, 7), (1.5, 0.3), seed=3).epoch_order(2), orders[2])
    assert Mixture((10,), (0.25,)).epoch_size == 3  # 2.5 rounds half up


def test_same_seed_same_order_and_epochs_differ():
    a = epoch_order([50, 20], [1, 2], seed=7, epoch=0)
    np.testing.assert_array_equal(a, epoch_order([50, 20], [1, 2], seed=7, epoch=0))
    assert not np.array_equal(a, epoch_order([50, 20], [1, 2], seed=8, epoch=0))
    b = epoch_order([50, 20], [1, 2], seed=7, epoch=1)
    assert not np.array_equal(a, b) and _counts(a) == _counts(b)
    assert not a.flags.writeable  # cached; a caller cannot corrupt later epochs


def test_stream_crosses_epochs_without_dropping():
    mixture = Mixture((5, 4), (1.0, 1.0), seed=1)  # 9 per epoch, batches of 4 straddle epochs
    batches = [mixture.global_batch(k, 4) for k in range(9)]  # 36 examples = 4 epochs
    stream = np.concatenate(batches)
    expected = np.concatenate([mixture.epoch_order(e) for e in range(4)])
    np.testing.assert_array_equal(stream, expected)


def test_batch_rows_pick_rows_of_the_global_batch():
    mixture = Mixture((13, 6), (2.0, 0.5), seed=11)  # 29 per epoch: batches cross epoch boundaries
    for position in range(12):
        global_batch = mixture.global_batch(position, 8)
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 6], list(range(8))):
            np.testing.assert_array_equal(mixture.batch_rows(position, 8, rows), global_batch[rows])
        np.testing.assert_array_equal(
            batch_rows([13, 6], [2.0, 0.5], 11, position, 8, [2, 5]), global_batch[[2, 5]]
        )


def test_bad_arguments_are_errors():
    mixture = Mixture((4,), (1.0,))
    with pytest.raises(ValueError, match="batch rows 6..8 are outside a batch of 8"):
        mixture.batch_rows(0, 8, [6, 8])
    with pytest.raises(ValueError, match="2 source sizes but 1 repeats"):
        Mixture((4, 5), (1.0,))
    with pytest.raises(ValueError, match="source 0: expected size >= 0 and finite repeats >= 0"):
        Mixture((4,), (-1.0,))
    with pytest.raises(ValueError, match="the mixture is empty"):
        Mixture((4, 0), (0.0, 3.0))
