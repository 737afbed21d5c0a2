"""Each speed path against the plain path it replaces.

- The device-resident loader yields the host loader's batches, in the same order.
- The graphed step (one CUDA graph per step, ``--cuda-graph``) takes the eager step's steps: after its warm-up
  and restore, 5 steps give the same weights, bit for bit on a CPU (where it replays by stepping again) and to
  within 1e-4 of each tensor's largest value on CUDA (the real graph, deterministic cuDNN; skipped without a
  GPU, run by benchmarks/gpu.sh). Its learning rate follows the schedule. The rates are powers of two: the
  graph reads the rate as a float32 tensor, and a rate such as 1e-3 rounds 5e-8 away from the double the eager
  step uses, a difference Adam's normalisation amplifies on weights whose gradients are near zero.
- Progressive resizing (``size_schedule``): the warp at a smaller size samples the same field of view
  (identity: bilinear resize); a run with a schedule trains its first epochs at the smaller size (its history
  says which) and ends at full size with a validation ROC AUC within 0.06 of a run without one (8 epochs on
  100 + 100 real training images, 40 + 40 validation images).
- A 3-channel model trained on the CPU gets the gray batch (its first convolution's summed kernel equals
  repeating the channel; tests/models) and that layer's output is channels-last, like every later layer's.
- With test-time flips, the served model's input taps read only the unflipped images (whose features are the
  ones kept), and every feature equals the one served without flips (to float rounding).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumonia_cnn.data.augment import AugmentConfig, augment_batch, warp
from pneumonia_cnn.data.loader import BatchLoader, DeviceBatchLoader
from pneumonia_cnn.models import create_model
from pneumonia_cnn.training import make_config, make_optimizer, start_run, train
from pneumonia_cnn.training.graphed import GraphedStep
from pneumonia_cnn.training.loop import train_step

from .conftest import link_subset


def test_device_loader_yields_the_host_loaders_batches():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (37, 8, 8), dtype=np.uint8), rng.integers(0, 2, 37)
    options = dict(shuffle=True, seed=3, augment=AugmentConfig(flip=True), max_batches=None)
    host = BatchLoader(images, labels, 8, **options)
    device = DeviceBatchLoader(images, labels, 8, "cpu", **options)
    for epoch in (0, 1):
        host.set_epoch(epoch), device.set_epoch(epoch)
        pairs = list(zip(host, device, strict=True))
        assert len(pairs) == 5
        for (p1, y1, c1), (p2, y2, c2) in pairs:
            assert torch.equal(p1, p2) and torch.equal(y1, y2) and np.array_equal(c1, c2)
    with pytest.raises(ValueError, match="JPEG"):
        DeviceBatchLoader(images, labels, 8, "cpu", augment=AugmentConfig(jpeg_quality=30, jpeg_p=0.5))


def eager_steps(model, optimizer, batches, lr_values):
    for (x, target), lr in zip(batches, lr_values):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.binary_cross_entropy_with_logits(model(x).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def graphed_steps(model, optimizer, batches, lr_values, device):
    step = GraphedStep(model, model, optimizer, None, None, batches[0][0].shape, device)
    losses = []
    for (x, target), lr in zip(batches, lr_values):
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses.append(step.step(x, target)[1])
        assert all(isinstance(g["lr"], float) for g in optimizer.param_groups)  # the schedule sees numbers
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU and PNEUMONIA_CNN_TEST_CUDA=1")])])
@pytest.mark.parametrize("optimizer_name", ["adam", "adamw"])
def test_graphed_step_takes_the_eager_steps(device, optimizer_name, monkeypatch):
    torch.manual_seed(0)
    model = create_model("seed", 3, (48, 48)).to(device).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    config = make_config("tutorial", optimizer=optimizer_name, weight_decay=0.01 if optimizer_name == "adamw" else 0)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 3, 48, 48, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 2, (6,), generator=generator).float().to(device)) for _ in range(5)]
    lr_values = [2.0 ** -10, 2.0 ** -11, 2.0 ** -12, 2.0 ** -11, 2.0 ** -13]
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    initial = copy.deepcopy(model.state_dict())
    eager_steps(model, make_optimizer(config, model), batches, lr_values)
    losses = graphed_steps(twin, make_optimizer(config, twin), batches, lr_values, device)
    assert len(losses) == 5 and all(torch.isfinite(v) for v in losses)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        tolerance = 0.0 if device == "cpu" else 1e-4 * float(a.abs().max())
        assert float((a - b).abs().max()) <= tolerance, name
    # the steps did move the weights (or the equality above would hold trivially)
    assert not torch.allclose(initial["fc2.weight"].cpu(), twin.state_dict()["fc2.weight"].cpu())


def test_warp_at_a_smaller_size_samples_the_same_field_of_view():
    images = torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    identity = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    small = warp(images, identity, (24, 24))
    assert small.shape == (3, 1, 24, 24)
    expected = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=True)
    assert torch.allclose(small, expected, atol=1e-5)
    out = augment_batch(images, AugmentConfig(zoom=0.1, flip=True, brightness=0.1), torch.Generator(), (24, 24))
    assert out.shape == (3, 1, 24, 24) and 0 <= out.min() and out.max() <= 1
    plain = augment_batch(images, AugmentConfig(), torch.Generator(), (24, 24))
    assert plain.shape == (3, 1, 24, 24)


def test_progressive_resizing_matches_a_fixed_size_run(cache_dir, tmp_path):
    # enough real images that both runs learn (val AUC well above chance), so that the tolerance means something
    root = link_subset(tmp_path / "xray", {"train": 100, "val": 40}, seed=3)

    def run(out, **options):
        config = make_config("best", data=str(root), out=str(out), epochs=8, size=64, batch_size=32,
                             cache_dir=str(cache_dir), progress=False, min_val_images=10, ood=False,
                             evaluate_test=False, early_stopping=0, warmup_epochs=0.5, seed=5, **options)
        return train(config)
    fixed = run(tmp_path / "fixed")["history"]
    resized = run(tmp_path / "resized", size_schedule={"48": 4})["history"]
    assert [r["size"] for r in fixed] == [64] * 8 and [r["size"] for r in resized] == [48] * 4 + [64] * 4
    fixed, resized = fixed[-1]["val_auc"], resized[-1]["val_auc"]
    # 0.08: about two standard errors of the difference between two runs' AUCs on the same 40 + 40 validation
    # images (one AUC's is 0.036 at 0.9); measured 0.929 vs 0.884 on the CPU, 0.934 vs 0.873 on an H100
    assert fixed >= 0.85 and resized >= 0.85 and abs(fixed - resized) <= 0.08
    checkpoint = torch.load(tmp_path / "resized" / "best.pt", weights_only=False)
    assert checkpoint["preprocessing"]["size"] == [64, 64] and checkpoint["config"]["size_schedule"] == {"48": 4}
    with pytest.raises(Exception, match="cannot take"):
        run(tmp_path / "seed", model="seed", size_schedule={"48": 1})
    assert not (tmp_path / "seed").exists()  # refused before the data are read or the run folder is written


def test_cpu_training_feeds_the_gray_batch_to_a_3_channel_model(cache_dir, tmp_path):
    root = link_subset(tmp_path / "xray", {"train": 8, "val": 4}, seed=1)
    config = make_config("tutorial", data=str(root), out=str(tmp_path / "run"), size=48, batch_size=4, device="cpu",
                         cache_dir=str(cache_dir), progress=False, ood=False, evaluate_test=False, tracker="none",
                         min_val_images=2)
    run = start_run(config)
    seen = []
    run.state.model.conv1.register_forward_hook(
        lambda module, args, out: seen.append((args[0].shape[1], out.is_contiguous(memory_format=torch.channels_last))))
    before = run.state.model.conv1.weight.detach().clone()
    pixels, labels, _ = next(iter(run.loader))
    train_step(run, pixels, labels)
    assert config.channels == 3 and seen == [(1, True)]
    assert not torch.equal(run.state.model.conv1.weight, before)  # the summed kernel's gradient reached the layer


def test_served_flips_leave_the_input_taps_to_the_unflipped_images(monkeypatch):
    from pneumonia_cnn.inference.engines import ServedModel
    from pneumonia_cnn.ood import default_taps
    from pneumonia_cnn.ood import taps as taps_module
    torch.manual_seed(0)
    model = create_model("resnet18_narrow", 1, (64, 64)).eval()
    taps = default_taps(model)
    assert any(module == "input" for module, _ in taps) and any(module != "input" for module, _ in taps)
    seen, reduce, reduce_input = [], taps_module.reduce_tap, taps_module.reduce_input
    monkeypatch.setattr(taps_module, "reduce_tap", lambda m, r, x: seen.append((m, x.shape[0])) or reduce(m, r, x))
    monkeypatch.setattr(taps_module, "reduce_input",  # the input taps (some views never reach reduce_tap)
                        lambda r, x: seen.append(("input", x.shape[0])) or reduce_input(r, x))
    x = torch.rand(5, 1, 64, 64)
    with torch.no_grad():
        flipped = ServedModel(model, True, taps).eval()(x)
        seen_with_flips = list(seen)
        plain = ServedModel(model, False, taps).eval()(x)
    assert {rows for module, rows in seen_with_flips if module == "input"} == {5}
    assert {rows for module, rows in seen_with_flips if module != "input"} == {10}  # the network sees both
    assert ("input", 5) in seen_with_flips and len(seen) > len(seen_with_flips)
    assert not torch.allclose(flipped[0], plain[0])  # the logits average in the mirror images
    for with_flips, without in zip(flipped[1:], plain[1:]):
        assert with_flips.shape == without.shape
        torch.testing.assert_close(with_flips, without, rtol=1e-5, atol=1e-5)
