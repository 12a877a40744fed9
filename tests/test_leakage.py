"""Gradient leakage: the attacks work where the literature says they do, and DP stops them."""
import json

import pytest
import torch

from atoll import cli, config, leakage as L

CFG = 'dtype = "float64"\nrounds = 2\n[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = [32]\n[eval]\nfederated = false\n'


@pytest.fixture(scope="module")
def setup():
    _, model, fed, _ = config.build(config.load(text=CFG))
    return model, {k: v.detach() for k, v in model.named_parameters()}, fed


def test_labels_and_inputs_leak_from_a_batch_of_one_without_defence(setup):
    model, params, fed = setup
    xs, ys = fed.x_test[:30], fed.y_test[:30]
    for i in range(30):
        g = L.gradient(model, params, xs[i:i + 1], ys[i:i + 1])
        assert L.idlg_label(g) == int(ys[i])
        torch.testing.assert_close(L.analytic_fc(g), xs[i], rtol=1e-8, atol=1e-8)


def test_dlg_recovers_an_input(setup):
    model, params, fed = setup
    x, y = fed.x_test[:1], fed.y_test[:1]
    g = L.gradient(model, params, x, y)
    guess = L.dlg(model, params, g, x.shape[1], L.idlg_label(g), steps=200)
    assert L.quality(x[0], guess)["psnr"] > 30


def test_dp_noise_destroys_the_analytic_reconstruction(setup):
    model, params, fed = setup
    out = L.audit(model, params, fed.x_test[:10], fed.y_test[:10], epsilons=(1, 8))
    assert out["none"]["label_rate"] == 1.0 and out["none"]["analytic_psnr"] > 100
    for row in out["dp"]:
        assert row["psnr"] < 20 and row["ssim"] < 0.1  # against > 100 dB and SSIM 1 undefended


def test_audit_command_writes_its_files(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CFG)
    run = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    assert cli.main(["audit", "leakage", str(run), "--samples", "3"]) == 0
    result = json.loads((run / "leakage.json").read_text())
    assert result["none"]["label_rate"] == 1.0 and (run / "leakage.png").stat().st_size > 0
    # scored in pixels against the training mean: DP leaves the attacker at that floor
    assert all(r["psnr"] <= result["prior"]["psnr"] + 0.5 for r in result["dp"]), result


def test_the_audit_noise_is_calibrated_like_the_accountant():
    from atoll.privacy import epsilon
    s = L.gaussian_sigma(2.0, 1e-5)
    assert abs(epsilon(1.0, s, 1, 1e-5) - 2.0) < 2e-3  # one Gaussian release, add/remove, PLD
    big = [L.gaussian_sigma(e, 1e-5) for e in (64, 1024, 4096)]  # e^eps overflowed a float once
    assert big[0] > big[1] > big[2] > 0


def test_what_compression_and_a_secure_sum_still_leak(setup):
    """Top-k keeps the rows the analytic attack reads at 10% and mostly drops them at 1%; the
    label still leaks through both. A secure sum is no longer one sample's gradient: a unit that
    only one member activated still gives that member away in a sum of 2 (the attacker's best
    case), less in a sum of 10, and the label is one of the cohort's either way."""
    model, params, fed = setup
    out = L.audit(model, params, fed.x_test[:10], fed.y_test[:10], epsilons=())
    ten, one = out["compressed"]
    assert ten["topk_fraction"] == 0.1 and ten["analytic_applies_rate"] == 1.0 and ten["ssim"] > 0.5
    assert one["analytic_applies_rate"] <= 0.5 and one["ssim"] < ten["ssim"] - 0.3
    assert ten["label_rate"] == one["label_rate"] == 1.0
    two, many = out["secure"]
    assert (two["clients"], many["clients"]) == (2, 10) and many["psnr"] < 40 < two["psnr"]
    assert two["label_in_cohort_rate"] == many["label_in_cohort_rate"] == 1.0
    assert L.top_k({"a": torch.tensor([3.0, -5.0, 1.0, 0.5])}, 0.5)["a"].tolist() == [3.0, -5.0, 0.0, 0.0]


def test_under_dp_the_attacker_does_no_better_than_guessing_the_mean_input(setup):
    """Scored in pixels (the standardisation undone), as image PSNR is reported: under DP at
    epsilon <= 8 the analytic attack stays at or below 12 dB (issue 15) and at or below what an
    attacker who saw no update gets by guessing the mean input, on digits and on the dense
    built-in ``mnistlike``. Scored in standardised units, the same guesses read 17 dB on digits."""
    text = CFG.replace('"digits"', '"mnistlike"').replace("[data]\n", "[data]\nnum_clients = 4\n")
    _, model, mnist, _ = config.build(config.load(text=text))
    assert mnist.x_test.shape[1] == 784
    for model, params, fed in [setup, (model, {k: v.detach() for k, v in model.named_parameters()}, mnist)]:
        prior = torch.cat([c.x for c in fed.clients]).mean(0)
        xs, ys = fed.x_test[:10], fed.y_test[:10]
        out = L.audit(model, params, xs, ys, epsilons=(1, 8), prior=prior, raw=(fed.x_mean, fed.x_std))
        assert out["none"]["analytic_psnr"] > 100 and out["none"]["label_rate"] == 1.0, fed.name
        assert 8 < out["prior"]["psnr"] < 12, (fed.name, out["prior"])
        for row in out["dp"]:
            assert row["psnr"] <= min(12.0, out["prior"]["psnr"] + 0.5), (fed.name, row)
    model, params, fed = setup
    out = L.audit(model, params, fed.x_test[:10], fed.y_test[:10], epsilons=(8,))
    assert out["dp"][0]["psnr"] > 15  # the units matter: standardised pixels score differently
