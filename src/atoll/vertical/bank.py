"""The bank and telecom data set of examples/bank_vertical (``[vertical] dataset = "bank"``):
generated customers with two latent causes of default; the bank holds 70 % of the people with
the label, the telecom 75 %, each in its own order, so their ids must be aligned first."""
from __future__ import annotations

import numpy as np

BANK_COLS = ["log_income", "debt_to_income", "credit_utilisation", "late_payments_2y", "account_years"]
TELECOM_COLS = ["monthly_bill", "late_bills_1y", "prepaid_topups", "tenure_months", "data_gb", "plan_changes"]


def generate(people: int, seed: int):
    """Seeded population with a default rate near 8 %, driven by two latent causes: financial
    stress ``s`` (the bank sees it in its features, the telecom in payment behaviour) and
    instability ``u`` (moves, job changes: visible in phone usage, not in bank records). Each
    party holds a different random subset of the people (ids ``P000123``) in its own order."""
    rng = np.random.default_rng(seed)
    s, u, thrift = rng.normal(size=people), rng.normal(size=people), rng.normal(size=people)
    noise = lambda scale=1.0: scale * rng.normal(size=people)  # noqa: E731
    bank = np.column_stack([
        rng.normal(10.5, 0.5, people) - 0.25 * s, np.clip(0.35 + 0.1 * s + noise(0.1), 0, None),
        np.clip(0.4 + 0.15 * s + noise(0.2), 0, 1), rng.poisson(np.exp(-0.5 + 0.6 * s)),
        rng.gamma(2.0, 4.0, people)])
    telecom = np.column_stack([
        rng.gamma(4.0, 12.0, people) + 5 * thrift, rng.poisson(np.exp(-1.0 + 0.6 * s + 0.5 * u)),
        rng.poisson(np.exp(0.5 + 0.3 * s + 0.4 * u)), rng.gamma(2.0, 20.0, people) * np.exp(-0.4 * u),
        rng.gamma(2.0, 3.0, people), rng.poisson(np.exp(-1.0 + 0.8 * u))])
    logit = -3.4 + 1.2 * s + 1.0 * u + noise(0.3)
    default = (rng.random(people) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    ids = np.array([f"P{i:06d}" for i in range(people)])
    at_bank = rng.permutation(people)[: int(0.7 * people)]
    at_telecom = rng.permutation(people)[: int(0.75 * people)]
    return ({"ids": ids[at_bank], "x": bank[at_bank], "default": default[at_bank]},
            {"ids": ids[at_telecom], "x": telecom[at_telecom]})
