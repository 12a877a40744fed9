"""The bank + telecom example (examples/bank_vertical): seeded data with different id sets, the
PSI alignment pairs the same people, and the split network learns on the aligned rows."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

PATH = Path(__file__).resolve().parents[2] / "examples" / "bank_vertical" / "bank_vertical.py"
spec = importlib.util.spec_from_file_location("bank_vertical", PATH)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)


def test_generator_is_seeded_and_parties_hold_different_ids_in_different_orders():
    bank, telecom = ex.generate(2000, 0)
    again, _ = ex.generate(2000, 0)
    assert np.array_equal(bank["x"], again["x"]) and np.array_equal(bank["ids"], again["ids"])
    assert len(set(bank["ids"])) == 1400 and len(set(telecom["ids"])) == 1500
    common = set(bank["ids"]) & set(telecom["ids"])
    assert 900 < len(common) < 1200 and set(bank["ids"]) != set(telecom["ids"])
    assert bank["x"].shape == (1400, 5) and telecom["x"].shape == (1500, 6)
    assert 0.04 < bank["default"].mean() < 0.14


def test_align_pairs_the_same_people():
    bank, telecom = ex.generate(2000, 0)
    b, t = ex.align(bank["ids"], telecom["ids"])
    assert np.array_equal(bank["ids"][b], telecom["ids"][t])
    assert len(b) == len(set(bank["ids"]) & set(telecom["ids"]))
    assert not np.array_equal(b, t)  # the rows sit at different positions: alignment was needed


def test_split_network_learns_and_the_telecom_can_attack_its_gradients():
    bank, telecom = ex.generate(3000, 1)
    b, t = ex.align(bank["ids"], telecom["ids"])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(b)))
    train, test = perm[:1200], perm[1200:]
    xs = {"bank": ex.standardise(bank["x"][b], train.numpy()),
          "telecom": ex.standardise(telecom["x"][t], train.numpy())}
    y = torch.from_numpy(bank["default"][b]).unsqueeze(1)
    auc, per_step, received = ex.split_nn(xs, y, train, test, 0.0, 0, epochs=4)
    assert auc > 0.65
    # per epoch every training row crosses once as a row id, an embedding and a gradient (8 wide)
    assert per_step * 40 == 4 * 1200 * (8 + 2 * 8 * 8)  # 4 epochs of 10 batches (9 x 128 + 48)
    rows, s = ex.leakage.norm_scores(received)
    assert ex.leakage.attack_auc(rows, s, y) > 0.8
