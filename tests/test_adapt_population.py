"""README (Generalisation to a new site): adapt refuses a site that the source flags, 90% or more, as outside its
training population. It had adapted the built-in model to adult X-rays (or to photographs) and refitted its
detector on them: the adapted model then flagged 0 of 54 other adults (54 of 54 before) while its card still
said children 1-5 years."""
import torch

from pneumonia_cnn.cli import main
from tests.conftest import SHARED, require_shared

ADULTS = SHARED / "data" / "adult_xray_dev" / "covid_collection"


def test_a_site_the_source_flags_is_refused_unless_accepted_and_then_recorded(tmp_path, capsys, caplog):
    require_shared()
    out = tmp_path / "adults.pt"
    assert main(["adapt", "builtin", "--data", str(ADULTS), "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ADULTS}: 115 of the site's 124 image(s) (93%) are outside the source's training population "
        f"(children 1–5 years, one hospital) by its out-of-distribution flag; adapting refits the detector on them, "
        f"so that it stops flagging them while the model card still states that population: check that --data holds "
        f"the site's chest X-rays of that population, or give --accept-outside-population to adapt anyway (the "
        f"record says so)")
    assert not out.exists()
    assert main(["adapt", "builtin", "--data", str(ADULTS), "--out", str(out), "--device", "cpu",
                 "--accept-outside-population"]) == 0
    assert "(--accept-outside-population)" in caplog.text
    record = torch.load(out, weights_only=True)["adaptation"]
    assert abs(record["outside_source_population"] - 115 / 124) < 1e-12
