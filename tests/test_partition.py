"""Partitioning: disjoint, complete, deterministic; Dirichlet label skew grows as alpha falls."""

import numpy as np
import pytest

import client_helper
from client_helper import label_skew, load_split, partition_indices, split_local

from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def labels():
    return load_split("mnist", "train").labels


@pytest.mark.parametrize("scheme, alpha", [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 10.0), ("shards", 1.0)])
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


def test_shards_give_each_client_two_label_sorted_shards(labels):
    """McMahan et al. 2017: sorted by label, 2N shards, two per client; with 100 clients each holds
    600 examples, and nearly every client sees one or two labels."""
    parts = partition_indices(labels, 100, "shards", 1.0, seed=0)
    assert {len(p) for p in parts} == {600}
    classes = [len(np.unique(labels[p])) for p in parts]
    assert max(classes) <= 4 and np.mean([c <= 2 for c in classes]) > 0.8
    assert label_skew(labels, parts) > label_skew(labels, partition_indices(labels, 100, "dirichlet", 0.5, seed=0))


def test_too_many_clients_for_the_data_is_refused(labels):
    with pytest.raises(client_helper.UsageError, match="use --num-clients 6000 or fewer"):
        partition_indices(labels, 6001, "iid", 1.0, seed=0)
    assert len(partition_indices(labels, 6000, "iid", 1.0, seed=0)) == 6000


def test_a_partition_crosses_the_wire_as_a_bitmap_exactly():
    from socket_methods import BadMessage, decode_bitmap, encode_bitmap

    indices = np.array([0, 7, 8, 9999, 10000])
    text = encode_bitmap(indices, 10001)
    assert np.array_equal(decode_bitmap(text, 10001), indices)
    assert len(text) == 4 * -(-(10001 + 7) // 8 // 3)  # base64 of ceil(10001 / 8) = 1251 bytes
    with pytest.raises(BadMessage, match="bits set past the end"):
        decode_bitmap(encode_bitmap([10003], 10004), 10001)
    with pytest.raises(BadMessage, match="has 2 bytes; 10001 examples need 1251"):
        decode_bitmap("AAA=", 10001)


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
