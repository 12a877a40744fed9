"""Hostile values for every key of the [vertical] section (atoll run and deployment), hostile
tables and hostile run folders: each refused with an error naming what was wrong, nothing run."""
import io
import json

import pytest
import torch

from atoll import config
from atoll.cli import main
from atoll.config.vertical import build
from atoll.deploy import vertical as deployed
from atoll.errors import ConfigError
from atoll.vertical import experiment, resume

from test_vertical_run import tables, toml

BAD = [  # (TOML lines of [vertical], what the error must name)
    ("botom = [4]", r"unknown key 'vertical.botom'; did you mean 'vertical.bottom'"),
    ("bottom = [0]", r"vertical.bottom.*greater than or equal to 1"),
    ("bottom = [-3]", r"vertical.bottom.*greater than or equal to 1"),
    ("bottom = [5000]", r"vertical.bottom.*less than or equal to 4096"),
    ("bottom = [4, 4, 4, 4, 4, 4, 4, 4, 4]", r"vertical.bottom.*at most 8 items"),
    ("bottom = [2.5]", r"vertical.bottom"),
    ('bottom = "wide"', r"vertical.bottom"),
    ("bottom = {atm = [4]}", r"bottom names party 'atm', which is not a party"),
    ("bottom = {telecom = [0]}", r"vertical.bottom.*telecom.*greater than or equal to 1"),
    ("bottom = [4096, 4096]", r"weights between hidden layers, more than 16777216"),
    ("hidden = [4096, 4096, 4096]", r"weights between hidden layers"),
    ("hidden = [0]", r"vertical.hidden.0.*greater than or equal to 1"),
    ("cut = 0", r"vertical.cut.*greater than or equal to 1"),
    ("cut = 100000", r"vertical.cut.*less than or equal to 4096"),
    ("noise = -0.1", r"vertical.noise.*greater than or equal to 0"),
    ("noise = nan", r"vertical.noise.*finite"),
    ("noise = inf", r"vertical.noise.*finite"),
    ("noise = 1e9", r"vertical.noise.*less than or equal to 1000"),
    ('protocol = "hetero_lr"\nnoise = 0.1', r"noise and bottom apply to protocol = 'split' only"),
    ('protocol = "hetero_lr"\nbottom = [4]', r"noise and bottom apply to protocol = 'split' only"),
    ('protocol = "split_nn"', r"vertical.protocol.*'split' or 'hetero_lr'"),
    ('dataset = "mnist"', r"vertical.dataset.*'bank'"),
    ('dataset = "bank"\npeople = 5', r"vertical.people.*greater than or equal to 10"),
    ('dataset = "bank"\npeople = 1000000000', r"vertical.people.*less than or equal to 1000000"),
    ('dataset = "bank"\ndata = {bank = "b.csv"}', r"give data .* or dataset .*, not both"),
    ('dataset = "bank"\ncolumns = {atm = ["x"]}', r"columns names party 'atm'"),
    ('dataset = "bank"\ncolumns = {bank = []}', r"vertical.columns.bank.*at least 1 item"),
    ('psi = "yes"', r"vertical.psi.*valid boolean"),
    ("psi = 1", r"vertical.psi.*valid boolean"),
    ("standardise = 0", r"vertical.standardise.*valid boolean"),
    ("lr = 0", r"vertical.lr.*greater than 0"),
    ("lr = inf", r"vertical.lr.*finite"),
    ("batch = 0", r"vertical.batch.*greater than or equal to 1"),
    ("batch = 1000000", r"vertical.batch.*less than or equal to 65536"),
    ("epochs = 0", r"vertical.epochs.*greater than or equal to 1"),
    ("seed = -1", r"vertical.seed.*greater than or equal to 0"),
    ("seed = 9223372036854775806", r"vertical.seed.*less than or equal to 9223372036854775805"),
    ("holdout = 1.0", r"vertical.holdout.*less than 1"),
    ("holdout = 0", r"vertical.holdout.*greater than 0"),
    ("key_bits = 512", r"vertical.key_bits.*greater than or equal to 1024"),
    ("key_bits = 1025", r"vertical.key_bits.*multiple of 8"),
    ("timeout = -1", r"vertical.timeout.*greater than 0"),
    ('optimizer = "lbfgs"', r"vertical.optimizer.*'adam' or 'sgd'"),
    ('name = "../../etc"', r"party name '../../etc' must be 1-64 letters"),
    ('parties = ["a", "a"]', r"parties \['a', 'a'\] repeat a name"),
    ('data = {"b a d" = "x.csv"}', r"party name 'b a d'"),
]


@pytest.mark.parametrize("lines,error", BAD, ids=[b[0] for b in BAD])
def test_a_bad_vertical_key_is_refused_naming_it(tmp_path, lines, error):
    with pytest.raises(ConfigError, match=error):
        config.load(text=f"[vertical]\n{lines}\n")
    (tmp_path / "party.toml").write_text(f"[vertical]\n{lines}\n")  # the deployed reader: the same
    with pytest.raises(ConfigError, match=error):
        deployed.load(tmp_path / "party.toml")


def test_a_vertical_run_refuses_horizontal_sections_and_a_deployed_party_a_table_per_party(tmp_path):
    with pytest.raises(ConfigError, match=r"a vertical run \(\[vertical\]\) does not use \['data', 'rounds'\]"):
        config.load(text='rounds = 3\n[data]\nname = "digits"\n[vertical]\ndataset = "bank"\n')
    for lines in ('data = {bank = "b.csv"}\nids = "i.txt"', 'ids = "i.txt"', 'data = "b.csv"'):
        (tmp_path / "p.toml").write_text(f"[vertical]\n{lines}\n")
        with pytest.raises(ValueError, match="data is this party's table .* and ids the aligned ids"):
            deployed.load(tmp_path / "p.toml")


@pytest.mark.parametrize("over,error", [
    ({"name": "atm"}, r"label party name = 'atm' needs its table in data"),
    ({"label": ""}, r"needs its table in data .* and label = its label column"),
    ({"parties": ["isp"]}, r"vertical.parties \['isp'\] are not the parties of the data \['telecom'\]"),
    ({"columns": {"telecom": ["u", "w"]}}, r"tel.csv: no column 'w'"),
    ({"label": "churn"}, r"bank.csv: no column 'churn'"),
    ({"id_column": "key"}, r"bank.csv: no column 'key'"),
    ({"data": {"bank": "nowhere.csv", "telecom": "tel.csv"}}, r"nowhere.csv"),
])
def test_bad_tables_or_parties_are_refused_before_training(tmp_path, over, error):
    tables(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        build(config.load(toml(tmp_path, **over)))


def test_bank_data_set_checks_its_party_names_and_columns():
    for seed in (-5, 2**63):  # the top-level seed too: torch's generators take 0 .. 2^63 - 1
        with pytest.raises(ValueError, match=r"seed: a vertical run needs a seed in \[0, "):
            build(config.load(text=f'seed = {seed}\n[vertical]\ndataset = "bank"\n'))
    with pytest.raises(ValueError, match="the bank data set's label party is 'bank', not 'atm'"):
        build(config.load(text='[vertical]\ndataset = "bank"\nname = "atm"\n'))
    with pytest.raises(ValueError, match=r"vertical.columns.telecom: \['nope'\] not among"):
        build(config.load(text='[vertical]\ndataset = "bank"\npeople = 50\ncolumns = {telecom = ["nope"]}\n'))
    v, parties = build(config.load(text='seed = 3\n[vertical]\ndataset = "bank"\npeople = 200\n'
                                        'columns = {telecom = ["data_gb", "tenure_months"]}\n'))
    assert v["seed"] == 3 and v["name"] == "bank" and v["parties"] == ["telecom"]
    assert parties["telecom"].columns == ["data_gb", "tenure_months"] and parties["telecom"].x.shape == (150, 2)
    assert parties["bank"].y is not None and parties["bank"].x.shape == (140, 5)


@pytest.mark.parametrize("cell,error", [("abc", r"line \d+, column 'u': 'abc' is not a number"),
                                        ("inf", r"line \d+, column 'u' is not finite"),
                                        ("nan", r"line \d+, column 'u' is not finite")])
def test_a_table_cell_that_is_not_a_finite_number_is_named(tmp_path, cell, error):
    tables(tmp_path)
    text = (tmp_path / "tel.csv").read_text().splitlines()
    ident, _, v = text[5].split(",")
    text[5] = f"{ident},{cell},{v}"
    (tmp_path / "tel.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=error):
        build(config.load(toml(tmp_path)))


@pytest.mark.parametrize("content,error", [
    (None, r"cannot be read as a UTF-8 CSV table .*Is a directory"),
    (b"id,u,v\nc001,\xff\xfe,1\n", r"cannot be read as a UTF-8 CSV table .*utf-8"),
    (b"id,u,v\nc001,\"" + b"9" * 200_000 + b"\",1\n", r"cannot be read as a UTF-8 CSV table .*field larger"),
    (b"", r"tel.csv: no column 'id'"),
    (b"id,u,v\n", r"tel.csv: no rows or no feature columns"),
])
def test_an_unreadable_table_is_refused_naming_the_file(tmp_path, content, error):
    tables(tmp_path)
    (tmp_path / "tel.csv").unlink()
    if content is None:
        (tmp_path / "tel.csv").mkdir()
    else:
        (tmp_path / "tel.csv").write_bytes(content)
    with pytest.raises(ValueError, match=error) as got:
        build(config.load(toml(tmp_path)))
    assert "tel.csv" in str(got.value)


def test_a_repeated_id_or_no_common_id_is_refused(tmp_path):
    tables(tmp_path)
    text = (tmp_path / "tel.csv").read_text()
    (tmp_path / "tel.csv").write_text(text + text.splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="tel.csv: the id column 'id' repeats an id"):
        build(config.load(toml(tmp_path)))
    (tmp_path / "tel.csv").write_text("id,u,v\nzz1,1.0,2.0\nzz2,0.5,1.0\n")
    settings, parties = build(config.load(toml(tmp_path)))
    with pytest.raises(ValueError, match="have no id in common"):
        experiment.run(settings, parties, tmp_path / "run")


def _finished(tmp_path):
    tables(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(toml(tmp_path, epochs=2)), "--out", str(out)]) == 0
    return out


def test_a_resume_may_not_change_the_run_nor_start_without_a_checkpoint(tmp_path, capsys):
    out = _finished(tmp_path)
    assert main(["run", "--resume", str(out), "--set", "vertical.noise=0.1"]) == 2
    assert "a resume cannot change the run" in capsys.readouterr().err
    (out / "checkpoint.pt").unlink()
    assert main(["run", "--resume", str(out)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["run", str(toml(tmp_path)), "--out", str(out)]) == 2  # not empty: refused
    assert "is not empty" in capsys.readouterr().err


def _tamper(path, change):
    ck = torch.load(path, weights_only=True)
    change(ck)
    buf = io.BytesIO()
    torch.save(ck, buf)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("change,error", [
    (lambda ck: ck.update(format="other"), "is not a checkpoint of a vertical run of 2 epochs"),
    (lambda ck: ck.update(epoch=9), "is not a checkpoint of a vertical run of 2 epochs"),
    (lambda ck: ck["losses"].pop(), "'losses' does not hold the 2 epochs' step losses"),
    (lambda ck: ck["losses"].__setitem__(0, "x"), "'losses' does not hold"),
    (lambda ck: ck["parties"]["telecom"]["model"].__setitem__("0.weight", torch.zeros(9, 9)),
     "does not fit this run's models"),
    (lambda ck: ck["label"]["opt"].pop("top"), "does not fit this run's models"),
    (lambda ck: ck["label"].__setitem__("noise", torch.zeros(3)), "does not fit this run's models"),
    (lambda ck: ck.update(parties={}), "does not fit this run's models"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, capsys, change, error):
    out = _finished(tmp_path)
    before = (out / "metrics.jsonl").read_bytes()
    _tamper(out / "checkpoint.pt", change)
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert error in err and "checkpoint.pt" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing lost


def test_a_checkpoint_holding_code_is_not_unpickled(tmp_path, capsys):
    out = _finished(tmp_path)

    class Boom:
        def __reduce__(self):
            return (print, ("PWNED",))
    torch.save({"format": resume.FORMAT, "epoch": 1, "x": Boom()}, out / "checkpoint.pt")
    assert main(["run", "--resume", str(out)]) == 2
    captured = capsys.readouterr()
    assert "PWNED" not in captured.out and "cannot be loaded safely" in captured.err
    assert json.loads((out / "final.json").read_text())["steps"] == 12
