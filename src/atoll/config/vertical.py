"""The ``[vertical]`` section: one schema for a simulated vertical run (``atoll run``) and for a
party of a deployed one (``atoll vertical serve|connect``), docs/vertical.md.

Deployment: ``data`` is this party's CSV table and ``ids`` the aligned ids. Simulation: ``data``
maps every party to its table (``{bank = "bank.csv", telecom = "telecom.csv"}``, aligned by PSI
first), or ``dataset`` names a generated one; ``columns`` picks a party's feature columns. Sizes
are bounded so that a typo cannot ask for a model that fills the memory.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_WIDTH, MAX_LAYERS, MAX_WEIGHTS, MAX_SEED = 4096, 8, 2**24, 2**63 - 3  # seed + 2: an int64
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Widths = Annotated[list[Width], Field(max_length=MAX_LAYERS)]
Columns = Annotated[list[str], Field(min_length=1, max_length=65536)]
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class VerticalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["split", "hetero_lr"] = "split"
    data: str | dict[str, str] | None = None  # deployment: this party's CSV; atoll run: {party: CSV}
    ids: str | None = None                      # deployment: the aligned ids (atoll psi --out)
    dataset: Literal["bank"] | None = None      # atoll run: a generated data set instead of data
    people: int = Field(8000, ge=10, le=1_000_000)  # ... of that many people
    columns: dict[str, Columns] = {}            # atoll run: a party's feature columns (default: all)
    psi: bool = Field(True, strict=True)  # atoll run: align the ids by PSI (else in the clear)
    id_column: str = "id"
    label: str = ""
    parties: list[str] = []
    name: str = "label"
    cut: int = Field(8, ge=1, le=MAX_WIDTH)     # embedding width per party (split)
    hidden: Widths = [16]                       # the top model's hidden widths (split)
    bottom: Widths | dict[str, Widths] = []     # bottom hidden widths before the cut: all or per party
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0, le=100, allow_inf_nan=False)
    batch: int = Field(128, ge=1, le=65536)
    epochs: int = Field(10, ge=1, le=100_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # None: the run's seed (atoll run), 0 deployed
    holdout: float = Field(0.3, gt=0, lt=1)
    noise: float = Field(0.0, ge=0, le=1000, allow_inf_nan=False)  # label-leakage defence (split)
    timeout: float = Field(60.0, gt=0, le=86400, allow_inf_nan=False)
    key_bits: int = Field(2048, ge=1024, le=8192, multiple_of=8)  # Paillier (hetero_lr)
    standardise: bool = Field(True, strict=True)

    @model_validator(mode="after")
    def _consistent(self):
        names = [self.name, *self.parties, *(self.data if isinstance(self.data, dict) else {})]
        bad = [n for n in names if not NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"party name {bad[0]!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if len(set(self.parties)) != len(self.parties) or self.name in self.parties:
            raise ValueError(f"parties {self.parties} repeat a name (or name {self.name!r})")
        if self.dataset is not None and self.data is not None:
            raise ValueError("give data (the parties' tables) or dataset (generated), not both")
        if self.protocol == "hetero_lr" and (self.noise or self.bottom):
            raise ValueError("noise and bottom apply to protocol = 'split' only")
        chains = [[self.cut, *self.hidden]] + [[*b, self.cut] for b in (
            self.bottom.values() if isinstance(self.bottom, dict) else [self.bottom])]
        weights = sum(a * b for c in chains for a, b in zip(c, c[1:]))
        if weights > MAX_WEIGHTS:
            raise ValueError(f"hidden/bottom/cut ask for {weights} weights between hidden layers, "
                             f"more than {MAX_WEIGHTS}")
        known = set(names) | ({"bank", "telecom"} if self.dataset == "bank" else set())
        for key in ("bottom", "columns"):
            value = getattr(self, key)
            unknown = sorted(set(value) - known) if isinstance(value, dict) else []
            if unknown:
                raise ValueError(f"{key} names party {unknown[0]!r}, which is not a party "
                                 f"(parties: {sorted(known)})")
        return self



def build(cfg) -> tuple[dict, dict]:
    """(the ``[vertical]`` settings as the run reads them, every party's table) of a simulated
    run: ``cfg`` a ``Config`` whose ``vertical`` is set; the tables read or generated here."""
    from atoll.vertical import tables
    v = cfg.vertical.model_dump()
    seed = cfg.seed if v["seed"] is None else v["seed"]
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: a vertical run needs a seed in [0, {MAX_SEED}], got {seed}")
    if v["dataset"] == "bank":
        from atoll.vertical.bank import BANK_COLS, TELECOM_COLS, generate
        if v["name"] not in ("label", "bank"):
            raise ValueError(f"vertical.name: the bank data set's label party is 'bank', not {v['name']!r}")
        bank, tel = generate(v["people"], seed)
        parties = {"bank": tables.Table(list(bank["ids"]), BANK_COLS, bank["x"], bank["default"]),
                   "telecom": tables.Table(list(tel["ids"]), TELECOM_COLS, tel["x"])}
        parties = {p: _pick(t, v["columns"].get(p), p) for p, t in parties.items()}
        v["name"] = "bank"
    elif isinstance(v["data"], dict):
        if v["name"] not in v["data"] or not v["label"]:
            raise ValueError(f"vertical: the label party name = {v['name']!r} needs its table in data "
                             f"(data names {sorted(v['data'])}) and label = its label column")
        parties = {p: tables.read_csv(path, v["id_column"], v["label"] if p == v["name"] else "",
                                      v["columns"].get(p)) for p, path in v["data"].items()}
    else:
        raise ValueError("vertical: atoll run needs data = {party = \"table.csv\", ...} (every party's "
                         "table) or dataset = \"bank\"")
    others = [p for p in parties if p != v["name"]]
    if v["parties"] and sorted(v["parties"]) != sorted(others):
        raise ValueError(f"vertical.parties {v['parties']} are not the parties of the data {others}")
    if v["protocol"] == "hetero_lr" and len(others) != 1:
        raise ValueError(f"vertical: hetero_lr trains with exactly one other party, got {others}")
    return v | {"seed": seed, "parties": others}, parties


def _pick(t, columns, party: str):
    """``t`` cut to ``columns`` (all when None); an unknown column is an error naming it."""
    if columns is None:
        return t
    unknown = [c for c in columns if c not in t.columns]
    if unknown or not columns:
        raise ValueError(f"vertical.columns.{party}: {unknown[:1] or 'no column'} not among {t.columns}")
    return type(t)(t.ids, list(columns), t.x[:, [t.columns.index(c) for c in columns]], t.y)
