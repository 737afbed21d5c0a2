"""The fast training path (channels-last, bf16 autocast, torch.compile) gives the plain fp32 results
within noise. Stated tolerance, on 3 epochs of real X-rays: validation ROC AUC within 0.05, validation
loss within 0.05, validation accuracy within 0.1."""
import pytest
import torch

from pneumonia_cnn.training import make_config, train


def run(small_root, cache_dir, out, **fast):
    config = make_config("tutorial", data=str(small_root), out=str(out), epochs=3, size=64, batch_size=16,
                         cache_dir=str(cache_dir), progress=False, min_val_images=10, ood=False,
                         evaluate_test=False, seed=11, **fast)
    return train(config)["history"][-1]


def test_fast_path_matches_plain_fp32(small_root, cache_dir, tmp_path):
    plain = run(small_root, cache_dir, tmp_path / "plain", amp="off", channels_last=False)
    fast = run(small_root, cache_dir, tmp_path / "fast", amp="bf16", channels_last=True)
    assert abs(plain["val_auc"] - fast["val_auc"]) <= 0.05
    assert abs(plain["val_loss"] - fast["val_loss"]) <= 0.05
    assert abs(plain["val_accuracy"] - fast["val_accuracy"]) <= 0.1


@pytest.mark.slow
def test_compiled_path_matches_plain(small_root, cache_dir, tmp_path):
    import shutil
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile needs a C compiler on the CPU")
    plain = run(small_root, cache_dir, tmp_path / "plain", amp="off", channels_last=False)
    compiled = run(small_root, cache_dir, tmp_path / "compiled", amp="off", compile=True)
    assert abs(plain["val_loss"] - compiled["val_loss"]) <= 0.05
    torch._dynamo.reset()
