"""The detector's content views: the image inside its dark margins, so that black side bands do not make an
adult look like a child (README, "Intended use and out-of-distribution warnings"; docs/ood.md, "Framing")."""
import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia_cnn.inference.bundle import load_bundle
from pneumonia_cnn.inference.scorer import Scorer
from pneumonia_cnn.ood import OODDetector
from pneumonia_cnn.ood.scorers import METHOD, THREE_VIEW_METHOD, site_recipe
from pneumonia_cnn.ood.taps import CONTENT_BOX_VIEWS, MARGIN_CAP, REDUCTIONS, _content_box, _content_span, reduce_input
from tests.conftest import SHARED_DATA, require_shared

ADULTS = SHARED_DATA.parent / "adult_xray_dev"


def side_bands(gray: np.ndarray, width_ratio: float = 1.2) -> np.ndarray:
    """Black bands left and right: the canvas ``width_ratio`` times as wide."""
    extra = int(round(gray.shape[1] * width_ratio)) - gray.shape[1]
    return np.pad(gray, ((0, 0), (extra // 2, extra - extra // 2)))


def gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def test_the_content_span_cuts_dark_margins_and_no_more_than_the_cap():
    image = torch.full((1, 1, 192, 192), 0.6)
    image[..., :24] = 0.0  # 24 black columns each side: the content is columns 24..167
    image[..., 168:] = 0.0
    image[..., :, 60:70] = 0.3  # a darker stripe inside the content stays in
    coarse = torch.nn.functional.avg_pool2d(image, 4)  # as _content_box reads the profile (2 x 2, then 2 x 2)
    left, right = _content_span(coarse.mean(dim=2)[:, 0])
    top, bottom = _content_span(coarse.mean(dim=3)[:, 0])
    assert (float(left), float(right)) == (24 / 192, 168 / 192)
    assert (float(top), float(bottom)) == (0.0, 1.0)  # every row holds content
    crop = _content_box(image)[0, 0]
    assert float(crop.min()) > 0.25  # no black left in the box: the margins are gone, the stripe is kept
    assert float((crop < 0.45).float().mean()) == pytest.approx(10 / 144, abs=0.01)

    uniform = torch.full((1, 48), 0.5)
    assert [float(v) for v in _content_span(uniform)] == [0.0, 1.0]  # nothing to cut
    half_dark = torch.cat([torch.zeros(1, 30), torch.ones(1, 18)], dim=1)
    assert float(_content_span(half_dark)[0]) == pytest.approx(MARGIN_CAP)  # cut no more than the cap
    assert float(_content_span(torch.flip(half_dark, dims=[1]))[1]) == pytest.approx(1 - MARGIN_CAP)  # either end


def test_the_input_taps_share_one_content_box_and_give_what_each_reduction_gives_alone():
    require_shared()
    path = sorted((SHARED_DATA / "test" / "NORMAL").glob("*.jpeg"))[0]
    image = torch.from_numpy(side_bands(gray(path))[None, None].astype(np.float32) / 255)
    image = torch.nn.functional.interpolate(image, size=(192, 160), mode="bilinear")  # not square
    names = ["thumbnail4", *CONTENT_BOX_VIEWS, "orientations4"]
    shared = reduce_input(names, image)
    for name in names:
        assert torch.equal(shared[name], REDUCTIONS[name](image)), name
    assert shared["orientations4_content"].shape == (1, 128) and shared["thumbnail4_content"].shape == (1, 16)


def test_the_half_resolution_image_is_avg_pool2d_bit_for_bit_and_exports_as_average_pool():
    """Eager torch sums four strided views (faster than its pooling of one channel); the features the stored
    detectors were fitted on must not move by a bit. The export keeps AveragePool (ONNX Runtime's fast op)."""
    import io

    import onnx
    import onnxruntime

    from pneumonia_cnn.ood.taps import _gray, _halved
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 1, 192, 192), (2, 1, 101, 77), (1, 1, 17, 16)]:
        image = torch.round(torch.rand(shape, generator=generator) * 255) / 255
        assert torch.equal(_halved(image), torch.nn.functional.avg_pool2d(image, 2)), shape
    color = torch.rand(2, 3, 20, 20, generator=generator)
    one_channel = color[:, :1]
    assert torch.equal(_gray(color), color.mean(dim=1, keepdim=True)) and _gray(one_channel) is one_channel

    class Halved(torch.nn.Module):
        def forward(self, x):
            return _halved(x)
    buffer = io.BytesIO()
    torch.onnx.export(Halved(), (image,), buffer, dynamo=False, opset_version=17)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert [node.op_type for node in graph.node] == ["AveragePool"]
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    exported = session.run(None, {graph.input[0].name: image.numpy()})[0]
    assert np.allclose(exported, _halved(image).numpy(), atol=1e-7)


def test_side_bands_leave_the_content_views_where_they_were_and_move_the_whole_frame_views():
    """The built-in detector's own k-NN distances (hand-checked): with the canvas 1.2 times as wide, the
    whole-frame thumbnail of an adult moves a quarter or more towards the children, the content views little
    either way, for children and adults alike."""
    require_shared()
    if not ADULTS.is_dir():
        pytest.skip(f"adult X-rays not available: {ADULTS} is absent")
    bundle = load_bundle("builtin")
    detector, preprocessing = bundle.ood, bundle.preprocessing
    scorers = {detector.taps[c["tap"]][1]: c["scorer"] for c in detector.components}
    children = sorted((SHARED_DATA / "test" / "NORMAL").glob("*.jpeg"))[:3]
    children += sorted((SHARED_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]
    adults = sorted((ADULTS / "covid_collection").glob("*.jpeg"))[:3]
    for path in children + adults:
        image = gray(path)
        pixels = np.stack([preprocessing.from_gray(image), preprocessing.from_gray(side_bands(image))])
        x = torch.from_numpy(pixels).float()[:, None] / 255
        distance = {name: scorer.score(REDUCTIONS[name](x).numpy()) for name, scorer in scorers.items()
                    if name != "mean_std"}
        for view in ("thumbnail4_content", "orientations4_content"):
            before, after = distance[view]
            assert abs(after - before) <= 0.15 * before, (path.name, view, before, after)
        if path in adults:
            before, after = distance["thumbnail4"]
            assert after <= 0.8 * before, (path.name, before, after)


@pytest.mark.parametrize("ratio, adults_at_least, children_at_most", [(1.2, 0.70, 0.05)])
def test_the_builtin_detector_still_flags_most_adults_with_black_side_bands(ratio, adults_at_least,
                                                                            children_at_most):
    """docs/ood.md (Framing): with the canvas 1.2 times as wide, 72.5% of the 178 adults are flagged (60.1% by
    the detector without content views) and 3.1% of the children (every second image of the shared test
    folder)."""
    require_shared()
    if not ADULTS.is_dir():
        pytest.skip(f"adult X-rays not available: {ADULTS} is absent")
    bundle = load_bundle("builtin")
    scorer = Scorer(bundle, "cpu")

    def flagged(paths) -> float:
        pixels = np.stack([bundle.preprocessing.from_gray(side_bands(gray(p), ratio)) for p in paths])
        return float(np.mean(bundle.ood.flagged(bundle.ood.score(scorer.score(pixels).features))))

    adults = sorted(ADULTS.glob("*/*.jpeg"))
    children = sorted((SHARED_DATA / "test").glob("*/*.jpeg"))[::2]
    assert len(adults) == 178 and len(children) == 260
    assert flagged(adults) >= adults_at_least
    assert flagged(children) <= children_at_most


def test_adapt_refits_without_the_content_views_and_a_detector_stored_without_its_method_is_named_by_its_taps():
    import torch.nn as nn

    class Model(nn.Module):
        feature_layers = ["conv"]

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

    recipe = site_recipe(Model())
    assert [tap for _, tap, _ in recipe] == [("conv", "mean_std"), ("input", "thumbnail4"), ("input", "orientations4")]
    stored = {key: value for key, value in load_bundle("builtin").ood.state().items() if key != "method"}
    assert OODDetector.from_state(stored).method == METHOD  # five taps: the content views
    three = dict(stored, taps=stored["taps"][:3], components=stored["components"][:3])
    assert OODDetector.from_state(three).method == THREE_VIEW_METHOD


def test_an_int8_export_needs_the_logit_to_know_which_nodes_are_the_taps(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from pneumonia_cnn.inference.quantize import tap_only_nodes
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"], name="relu"),
                               helper.make_node("Abs", ["image"], ["tap0"], name="tap")], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1]),
                               helper.make_tensor_value_info("tap0", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "no_logit.onnx")
    with pytest.raises(ValueError, match="no node gives the output 'logit'"):
        tap_only_nodes(tmp_path / "no_logit.onnx")
    graph.node[0].output[0] = "logit"
    graph.output[0].name = "logit"
    onnx.save(helper.make_model(graph), tmp_path / "logit.onnx")
    assert tap_only_nodes(tmp_path / "logit.onnx") == ["tap"]
