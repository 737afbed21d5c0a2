import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pneumonia_cnn.data.augment import (
    AugmentConfig,
    _gaussian_blur,
    affine_grid,
    augment_batch,
    compose_keras_matrix,
    keras_transform_matrices,
    warp,
)


def keras_reference(image, theta_deg, tx, ty, shear_deg, zx, zy, flip):
    """What Keras' ImageDataGenerator.apply_transform does (keras/src/legacy/preprocessing/image.py)."""
    theta, shear = np.deg2rad(theta_deg), np.deg2rad(shear_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    matrix = rotation @ shift @ shearing @ zoom
    h, w = image.shape
    o_x, o_y = h / 2 + 0.5, w / 2 + 0.5
    to_centre, from_centre = (np.array([[1, 0, s * o_x], [0, 1, s * o_y], [0, 0, 1]]) for s in (1, -1))
    matrix = to_centre @ matrix @ from_centre
    out = ndimage.affine_transform(image, matrix[:2, :2], matrix[:2, 2], order=1, mode="nearest")
    return out[:, ::-1] if flip else out


def test_batch_warp_equals_keras_apply_transform():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((40, 52)), 2)
    cases = [(0, 0, 0, 0.2, 1.2, 0.8, False), (12, 3, -4, 8, 0.9, 1.1, True), (0, 0, 0, 0, 1, 1, True)]
    for theta, tx, ty, shear, zx, zy, flip in cases:
        expected = keras_reference(image, theta, tx, ty, shear, zx, zy, flip)
        t = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
        matrix = compose_keras_matrix(torch.deg2rad(t(theta)), t(tx), t(ty), torch.deg2rad(t(shear)), t(zx), t(zy),
                                      torch.tensor([flip]), *image.shape)
        ours = warp(torch.tensor(image, dtype=torch.float32)[None, None], matrix)[0, 0].numpy()
        assert np.abs(ours - expected).max() < 1e-4, (theta, shear, zx, zy, flip)


def test_tutorial_parameters_have_keras_meanings():
    config = AugmentConfig(shear=0.2, zoom=0.2, flip=True)
    generator = torch.Generator().manual_seed(0)
    matrices = keras_transform_matrices(4000, 64, 64, config, generator)
    # shear is an angle in degrees: at most 0.2 degrees, so off-diagonal terms stay below sin(0.2 deg)*1.2
    flips = matrices[:, 1, 1] < 0
    assert 0.45 < flips.double().mean() < 0.55
    zx = matrices[:, 0, 0].abs()
    assert zx.min() >= 0.8 - 1e-6 and zx.max() <= 1.2 + 1e-6
    zy_abs = (matrices[:, 1, 1].abs() / torch.cos(torch.tensor(np.deg2rad(0.2))))
    assert np.corrcoef(zx.numpy(), zy_abs.numpy())[0, 1] < 0.1  # drawn independently
    assert matrices[:, 0, 1].abs().max() <= np.sin(np.deg2rad(0.2)) * 1.2 + 1e-9


def test_augment_batch_keeps_shape_range_and_changes_images():
    images = torch.rand(8, 1, 32, 32)
    config = AugmentConfig(zoom=0.2, flip=True, rotation=10, brightness=0.1, contrast=0.2, gamma=0.3,
                           blur_sigma=1.5, blur_p=1.0, noise=0.05)
    out = augment_batch(images, config, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0.01
    same = augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(same, images)


def test_scale_is_isotropic():
    config = AugmentConfig(scale=0.25)
    matrices = keras_transform_matrices(500, 32, 32, config, torch.Generator().manual_seed(0))
    assert torch.allclose(matrices[:, 0, 0], matrices[:, 1, 1])
    assert matrices[:, 0, 0].min() >= 0.75 - 1e-6 and matrices[:, 0, 0].max() <= 1.25 + 1e-6


@pytest.mark.filterwarnings("ignore:Since version 1.3.0")  # torch on its own unit-size grids
@pytest.mark.parametrize("size", [(192, 192), (160, 128), (7, 5), (1, 5), (5, 1)])
def test_affine_grid_equals_torchs(size):
    """The broadcast grid computes torch's batched product in the same order (bit-equal on our CPU; the bound
    leaves room for a matrix library that fuses the multiply-adds)."""
    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    theta[:, 0, 0] += 1
    theta[:, 1, 1] += 1
    expected = F.affine_grid(theta, [16, 1, *size], align_corners=True)
    assert torch.allclose(affine_grid(theta, size), expected, rtol=0, atol=1e-6)


def test_blur_touches_only_the_chosen_images_and_blurs_them_as_the_whole_batch_would():
    images = torch.rand(16, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    config = AugmentConfig(blur_sigma=2.0, blur_p=0.5)
    out = augment_batch(images, config, torch.Generator().manual_seed(2))
    draws = torch.Generator().manual_seed(2)  # augment_batch's draws for blur, in its order
    apply = torch.rand(16, generator=draws) < 0.5
    sigmas = torch.where(apply, 2.0 * torch.rand(16, generator=draws), torch.zeros(16))
    assert 0 < int(apply.sum()) < 16
    assert torch.equal(out[~apply], images[~apply])
    assert torch.equal(out[apply], _gaussian_blur(images, sigmas)[apply])


@pytest.mark.parametrize("values, message", [
    ({"zoom": -5}, "zoom: expected a number from 0 to 1, got -5"),
    ({"flip": "maybe"}, "flip: expected true or false, got 'maybe'"),
    ({"blur_p": 1.5}, "blur_p: expected a number from 0 to 1, got 1.5"),
    ({"rotation": "7"}, "rotation: expected a number from 0 to 180, got '7'"),
    ({"jpeg_quality": 30.5}, "jpeg_quality: expected a whole number, got 30.5"),
    ({"noise": True}, "noise: expected a number from 0 to 1, got True")])
def test_augmentation_options_out_of_their_range_are_refused(values, message):
    from pneumonia_cnn.data.augment import AugmentConfig
    from pneumonia_cnn.errors import ConfigError
    from pneumonia_cnn.training import make_config
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        AugmentConfig.from_dict(values)
    with pytest.raises(ConfigError, match=f"^augment: {re.escape(message)}$"):  # what train --augment reports
        make_config("tutorial", data="d", out="o", augment=values)
