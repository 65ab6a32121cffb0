"""Augmentation of the clients' training images (--augment affine): in-process, what the map does
to an image, that it is drawn from the round's seed, and that training uses it; over a socket, that
a run with it refuses a client that does not know it."""

from __future__ import annotations

import math

import pytest
import torch

import neural_net_helper as nnh
from conftest import FAST
from test_compression import RawPeer


def test_a_map_with_no_range_leaves_the_images_as_they_are():
    x = torch.rand(8, 1, 28, 28)
    out = nnh.random_affine(x, torch.Generator().manual_seed(0), degrees=0.0, shift=0.0, scale=0.0)
    assert torch.allclose(out, x, atol=1e-5)


def test_the_map_turns_shifts_and_zooms_within_its_ranges():
    """A bright dot in the middle of an image lands within 10% of the size, plus the zoom's and the
    turn's share, of where it was; over many draws it moves, and no image is left as it was."""
    x = torch.zeros(256, 1, 28, 28)
    x[:, :, 13:15, 13:15] = 1.0
    out = nnh.random_affine(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    rows, cols = torch.arange(28.0).view(1, 28, 1), torch.arange(28.0).view(1, 1, 28)
    mass = out[:, 0].sum(dim=(1, 2))
    centre_r = (out[:, 0] * rows).sum(dim=(1, 2)) / mass
    centre_c = (out[:, 0] * cols).sum(dim=(1, 2)) / mass
    moved = torch.maximum((centre_r - 13.5).abs(), (centre_c - 13.5).abs())
    # the offset (10% of the size in the input's coordinates) moves the content by zoom x turn x offset:
    # at most 1.1 x (cos 10° + sin 10°) x 2.8 pixels along an axis; half a pixel more for the sampling
    bound = 1.1 * (math.cos(math.radians(10)) + math.sin(math.radians(10))) * 0.1 * 28 + 0.5
    assert float(moved.max()) <= bound
    assert float(moved.mean()) > 0.5
    assert all(not torch.equal(out[i], x[i]) for i in range(len(x)))


def test_the_draws_come_from_the_generator():
    x = torch.rand(4, 3, 32, 32)
    one = nnh.random_affine(x, torch.Generator().manual_seed(7))
    two = nnh.random_affine(x, torch.Generator().manual_seed(7))
    other = nnh.random_affine(x, torch.Generator().manual_seed(8))
    assert torch.equal(one, two) and not torch.equal(one, other)


class Spec:
    input_shape, num_classes = (1, 28, 28), 2


def trained(augment: str, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 2, (64,))
    model = nnh.build_model("cnn", Spec)
    nnh.train(model, x, y, epochs=1, batch_size=16, lr=0.05, seed=seed, augment=augment)
    return nnh.get_weights(model)


def test_training_with_augmentation_sees_other_images_and_repeats_from_its_seed():
    plain, augmented, again = trained("none"), trained("affine"), trained("affine")
    assert all(torch.equal(augmented[k], again[k]) for k in plain)
    assert any(not torch.allclose(plain[k], augmented[k]) for k in plain)


def test_augmentation_of_anything_but_images_is_refused():
    model = nnh.build_model("logreg", Spec)
    with pytest.raises(ValueError, match="augmentation 'affine' is not one of none, affine for these examples"):
        nnh.train(model, torch.zeros(4, 784), torch.zeros(4, dtype=torch.long), epochs=1, batch_size=2, lr=0.1, seed=0,
                  augment="affine")
    with pytest.raises(ValueError, match="augmentation 'mixup'"):
        nnh.train(model, torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), epochs=1, batch_size=2, lr=0.1,
                  seed=0, augment="mixup")


@pytest.mark.processes
def test_a_run_with_augmentation_refuses_a_client_without_the_feature(cluster, tmp_path):
    cluster.server(*FAST, "--num-clients", "1", "--augment", "affine", output_dir=tmp_path / "run")
    peer = RawPeer(cluster.port, client_id=1, features=["compression"])
    messages = peer.read_until({"<ERROR>"})
    assert messages and messages[-1]["header"] == "<ERROR>", messages
    assert "this run needs the client features augment" in messages[-1]["message"]
    peer.close()
