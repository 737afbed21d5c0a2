import json

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.explanation import grad_cam
from pneumonia_cnn.inference import Predictor
from tests.conftest import write_image


def patch_image(rng, size=64, patch=None):
    """A smooth bright middle with mild grain (noise alone is "not an X-ray", which train leaves out)."""
    image = (70 + 80 * np.outer(np.hanning(size), np.hanning(size)) + rng.normal(0, 5, (size, size))).clip(0, 255)
    if patch is not None:
        r, c = patch
        image[r:r + 14, c:c + 14] = 235
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """A model trained where the only class evidence is a bright patch at a random place."""
    from pneumonia_cnn.training import make_config, train
    root = tmp_path_factory.mktemp("patch")
    rng = np.random.default_rng(0)
    for split, count in (("train", 150), ("val", 20)):
        for i in range(count):
            write_image(root / split / "NORMAL" / f"IM-{i:04d}-0001.png", patch_image(rng))
            spot = tuple(rng.integers(4, 46, 2))
            write_image(root / split / "PNEUMONIA" / f"person{i}_virus_{i}.png", patch_image(rng, patch=spot))
    config = make_config("tutorial", data=str(root), out=str(root / "run"), epochs=4, size=64, batch_size=16,
                         augment={}, cache_dir=str(root / "cache"), progress=False, min_val_images=10, ood=False,
                         evaluate_test=False, seed=1)
    train(config)
    return root


def test_map_points_at_the_patch(patch_run):
    predictor = Predictor(patch_run / "run" / "best.pt", "cpu")
    rng = np.random.default_rng(42)
    hits = 0
    for r, c in ((8, 10), (40, 36), (20, 44), (44, 8)):
        image = patch_image(rng, patch=(r, c))
        cam = grad_cam(predictor.models[0], image, predictor.device)
        assert cam.std() > 0.01  # not constant
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        hits += (r - 3 <= peak[0] <= r + 16) and (c - 3 <= peak[1] <= c + 16)
    assert hits >= 3
    assert predictor.probabilities_from_pixels(patch_image(rng, patch=(20, 20))[None])[0] > 0.5


def test_explain_cli_writes_overlay_and_map(patch_run, tmp_path, capsys):
    image = write_image(tmp_path / "in" / "x.png", patch_image(np.random.default_rng(3), patch=(30, 30)))
    (tmp_path / "in" / "bad.png").write_bytes(b"")  # --out outside the images' folder: predict would read it
    assert main(["explain", str(patch_run / "run"), str(image), str(tmp_path / "in" / "bad.png"), str(image), "--out",
                 str(tmp_path / "maps")]) == 0
    assert capsys.readouterr().out.count("x.png: p=") == 1  # named twice, explained once
    cam = np.load(tmp_path / "maps" / "x_gradcam.npy")
    # the saved map is Grad-CAM of the checkpoint's model on the image as preprocessed, scaled to span [0, 1]
    predictor = Predictor(patch_run / "run" / "best.pt", "cpu")
    direct = grad_cam(predictor.models[0], predictor.preprocess_path(image)[0], predictor.device)
    assert cam.shape == (64, 64) and np.allclose(cam, direct, atol=1e-5)
    assert cam.min() == 0 and cam.max() == pytest.approx(1)
    assert (tmp_path / "maps" / "x_gradcam.png").stat().st_size > 1000
    assert main(["explain", str(patch_run / "run"), str(image), "--out", str(tmp_path / "m2"), "--layer",
                 "conv2"]) == 0


def test_explain_gives_predicts_answer_with_its_out_of_distribution_warning(tmp_path, capsys):
    """explain printed a probability and label with no flag, for an adult X-ray predict flags (a hostile audit,
    2026-11-27): it now states predict's answer for the image, warning included."""
    from tests.conftest import SHARED, require_shared
    require_shared()
    adult = sorted((SHARED / "data" / "adult_xray_dev" / "actualmed").iterdir())[0]
    from pneumonia_cnn.cli import main
    assert main(["predict", str(adult), "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)[0]
    assert expected["in_distribution"] is False
    assert main(["explain", str(adult), "--out", str(tmp_path / "maps")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{adult}: p={expected['probability']:.4f} {expected['label']} -> ")
    assert lines[1:] == [f"  warning: {w}" for w in expected["warnings"]]


def test_a_models_cell_centres_are_worked_out_once_and_the_map_is_unchanged(monkeypatch, patch_run):
    """The served model's receptive-field centres are cached per model, input shape and layer: the second map
    of a model costs no probe, a second model gets its own, and maps equal those made with no cache. (The seed
    model's valid convolutions shrink its map, 12 x 12 on 64: placed at measured centres; a map that tiles the
    input, the built-in ResNet's, is resized.)"""
    import copy

    import torch

    from pneumonia_cnn import explanation
    from tests.conftest import SHARED_DATA
    predictor = Predictor(patch_run / "run" / "best.pt", "cpu")
    pixels = [predictor.preprocess_path(path)[0] for path in sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:2]]
    model, other = predictor.bundle.explain_model(), predictor.bundle.explain_model()
    uncached = [grad_cam(copy.deepcopy(model), image, torch.device("cpu")) for image in pixels]
    probes = []
    real = explanation._cell_centres
    monkeypatch.setattr(explanation, "_cell_centres", lambda *args: probes.append(1) or real(*args))
    maps = [grad_cam(model, image, torch.device("cpu")) for image in pixels]
    assert len(probes) == 1 and all(np.array_equal(a, b) for a, b in zip(maps, uncached))
    assert all(parameter.grad is None for parameter in model.parameters())  # freed after each map
    grad_cam(other, pixels[0], torch.device("cpu"))
    assert len(probes) == 2


def test_the_map_is_textbook_grad_cam_with_no_parameter_gradient_made(monkeypatch):
    """The backward pass stops at the explained layer (benchmarks/gradcam_speed.py measures it): the cell map
    is still the ReLU of the layer's channels weighted by the spatial mean of the score's gradient, as a full
    backward pass with ``retain_grad`` gives it, and no parameter of the model receives a gradient."""
    import torch

    from pneumonia_cnn import explanation
    from pneumonia_cnn.data.loader import to_model_input
    from pneumonia_cnn.models import last_conv_layer_name
    from tests.conftest import SHARED_DATA, require_shared
    require_shared()
    predictor = Predictor("builtin", "cpu")
    image = predictor.preprocess_path(sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0])[0]
    model = predictor.bundle.explain_model()
    layer = dict(model.named_modules())[last_conv_layer_name(model)]
    captured = {}

    def keep(_module, _inputs, output):  # returns None: the output goes on unchanged
        output.retain_grad()
        captured["out"] = output
    handle = layer.register_forward_hook(keep)
    model.eval()
    model(to_model_input(torch.from_numpy(image)[None], torch.device("cpu"))).sum().backward()
    handle.remove()
    out = captured["out"]
    expected = torch.relu((out.grad.mean(dim=(2, 3), keepdim=True) * out).sum(dim=1, keepdim=True)).detach()
    model.zero_grad(set_to_none=True)
    accumulated = []
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    cells = []
    real = explanation._on_input
    monkeypatch.setattr(explanation, "_on_input", lambda cam, *rest: cells.append(cam) or real(cam, *rest))
    drawn = grad_cam(model, image, torch.device("cpu"))
    assert expected.shape[2] > 1 and expected.max() > 0
    assert torch.allclose(cells[0], expected, rtol=1e-5, atol=1e-7)
    # the 6 x 6 map tiles the 192 x 192 input: each cell over its 32 x 32 tile, resized as Grad-CAM's authors and
    # pytorch-grad-cam do (it had been drawn over rows 10-156 and columns 21-158, never reaching a lung base)
    resized = torch.nn.functional.interpolate(expected, size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    resized = ((resized - resized.min()) / (resized.max() - resized.min())).numpy()
    assert expected.shape[2:] == (6, 6) and np.allclose(drawn, resized, atol=1e-5)
    assert accumulated == [] and all(parameter.grad is None for parameter in model.parameters())


def test_frozen_weights_give_the_same_map_and_a_layer_the_forward_pass_skips_is_named():
    """A fine-tuned model may hold frozen layers: the map needs no weight gradient (it had raised autograd's
    RuntimeError). A --layer the forward pass never runs was a KeyError traceback; it is now one line."""
    import torch

    from pneumonia_cnn.errors import PneumoniaCNNError
    from tests.conftest import SHARED_DATA, require_shared
    require_shared()
    predictor = Predictor("builtin", "cpu")
    image = predictor.preprocess_path(sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[1])[0]
    model = predictor.bundle.explain_model()
    expected = grad_cam(model, image, torch.device("cpu"))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert np.array_equal(grad_cam(model, image, torch.device("cpu")), expected)
    model.unused = torch.nn.Conv2d(1, 1, 3)
    with pytest.raises(PneumoniaCNNError, match=r"^--layer unused: the model's forward pass does not run it$"):
        grad_cam(model, image, torch.device("cpu"), "unused")


def test_the_placement_follows_the_layers_not_a_size_that_happens_to_divide(monkeypatch):
    """Chosen by whether the map's side divided the input's, the seed model at 80 (16 x 16) was resized as if
    its cells tiled the input (8 px off), and the built-in ResNet at 200 (7 x 7) got the measured centres that
    had drawn its maps over rows 10-156."""
    import torch

    from pneumonia_cnn import explanation
    from pneumonia_cnn.models import create_model, list_models
    assert {name for name in list_models() if explanation._shrinks(create_model(name))} == {"seed"}
    measured = []
    real = explanation._to_input_grid
    monkeypatch.setattr(explanation, "_to_input_grid", lambda *args: measured.append(1) or real(*args))
    rng = np.random.default_rng(0)
    seed = create_model("seed", in_channels=1, image_size=(80, 80)).eval()
    grad_cam(seed, rng.integers(0, 256, (80, 80), dtype=np.uint8), torch.device("cpu"))
    assert measured == [1]  # 16 x 16 on 80: divides, and is still placed at its cells' centres
    resnet = create_model("resnet18_narrow", in_channels=1).eval()
    grad_cam(resnet, rng.integers(0, 256, (200, 200), dtype=np.uint8), torch.device("cpu"))
    assert measured == [1]  # 7 x 7 on 200: resized
