import pytest
import torch

from pneumonia_cnn.models import count_parameters, create_model, format_summary, list_models


def test_seed_is_the_tutorial_model_exactly():
    model = create_model("seed", in_channels=3, image_size=(224, 224))
    assert count_parameters(model) == (11_169_089, 0)
    table = format_summary(model, 3, (224, 224), "seed")
    for shape in ("222, 222, 32", "111, 111, 32", "109, 109, 64", "54, 54, 64", "52, 52, 128", "26, 26, 128",
                  "(None, 86528)", "(None, 128)", "(None, 1)"):
        assert shape in table
    assert "Total params: 11,169,089" in table


@pytest.mark.parametrize("name", sorted(list_models()))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_builds_for_any_channels_and_size(name, channels):
    model = create_model(name, in_channels=channels, image_size=(72, 64)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 72, 64))
        gray = model(torch.rand(2, 1, 72, 64))  # gray input is accepted by RGB models
    assert out.shape == (2,) and gray.shape == (2,)


def test_gray_input_equals_repeated_rgb():
    model = create_model("seed", 3, (48, 48)).eval()
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_gray_input_comes_out_of_the_first_convolution_channels_last():
    """On the CPU the summed one-channel kernel keeps the layout of every later layer: a channels-first output
    made the seed model's forward 1.8x slower (README, "Speed")."""
    model = create_model("seed", 3, (48, 48)).eval()
    with torch.no_grad():
        out = model.conv1(torch.rand(2, 1, 48, 48))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_a_gray_batch_trains_a_3_channel_model_as_the_repeated_batch_does():
    """CPU training feeds the gray batch to the summed kernel: the same gradients as three repeated channels."""
    torch.manual_seed(0)
    model = create_model("seed", 3, (48, 48)).to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 48, 48)
    grads = []
    for batch in (x, x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)):
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(batch), torch.tensor([0.0, 1, 1, 0])).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0]["conv1.weight"].abs().sum() > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")


def test_seed_pools_before_relu_exactly_as_keras_relu_then_pool():
    """The reordering that makes training faster changes neither outputs nor gradients."""
    torch.manual_seed(0)
    model = create_model("seed", 3, (48, 48))
    x = torch.randn(3, 3, 48, 48)

    def keras_order(m, x):
        f = torch.nn.functional
        x = f.max_pool2d(f.relu(m.conv1(x)), 2)
        x = f.max_pool2d(f.relu(m.conv2(x)), 2)
        x = f.max_pool2d(f.relu(m.conv3(x)), 2)
        return m.fc2(f.relu(m.fc1(x.flatten(1)))).squeeze(1)
    ours = model(x)
    grads_ours = torch.autograd.grad(ours.sum(), list(model.parameters()))
    theirs = keras_order(model, x)
    grads_theirs = torch.autograd.grad(theirs.sum(), list(model.parameters()))
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_theirs))


def test_local_weights_file_loads_and_a_bad_one_is_named(tmp_path):
    from pneumonia_cnn.errors import CheckpointError
    source = create_model("resnet18_narrow", 1, (64, 64))
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    loaded = create_model("resnet18_narrow", 1, (64, 64), weights=str(tmp_path / "weights.pt"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "bad.pt").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="bad.pt"):
        create_model("resnet18_narrow", 1, (64, 64), weights=str(tmp_path / "bad.pt"))
