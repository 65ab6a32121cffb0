"""Partitioning: disjoint, complete, deterministic; Dirichlet label skew grows as alpha falls."""

import numpy as np
import pytest

import client_helper
from client_helper import label_skew, load_split, partition_indices, split_local

from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def labels():
    return load_split("mnist", "train").labels


@pytest.mark.parametrize("scheme, alpha", [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 10.0)])
def test_partitions_are_disjoint_complete_and_deterministic(labels, scheme, alpha):
    parts = partition_indices(labels, 7, scheme, alpha, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 7
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)  # every example exactly once
    again = partition_indices(labels, 7, scheme, alpha, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = partition_indices(labels, 7, scheme, alpha, seed=4)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))
    assert min(len(p) for p in parts) >= client_helper.MIN_PARTITION_SIZE


def test_iid_shares_are_equal_and_balanced(labels):
    parts = partition_indices(labels, 5, "iid", 1.0, seed=0)
    assert {len(p) for p in parts} == {12000}
    assert label_skew(labels, parts) < 0.03


def test_label_skew_grows_as_alpha_falls(labels):
    skews = [label_skew(labels, partition_indices(labels, 10, "dirichlet", alpha, seed=0)) for alpha in (100, 1, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_local_split_holds_out_a_tenth_deterministically():
    indices = np.arange(1000, 2000)
    train, test = split_local(indices, seed=0, client_id=2)
    assert len(test) == 100 and len(train) == 900
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(indices)
    again = split_local(indices, seed=0, client_id=2)
    assert np.array_equal(train, again[0])


def test_fashion_mnist_reads_from_a_data_root():
    split = load_split("fashion-mnist", "test", SHARED_DATA)
    assert split.images.shape == (10000, 1, 28, 28) and split.labels.shape == (10000,)
    assert np.bincount(split.labels).tolist() == [1000] * 10


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(client_helper.UsageError, match="MNIST files are missing"):
        load_split("mnist", "train", tmp_path)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(client_helper.UsageError, match="cannot read"):
        load_split("mnist", "train", tmp_path)
