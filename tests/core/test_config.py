import pytest

from atoll import config


def test_defaults_validate_and_dump_round_trip():
    cfg = config.load(text="rounds = 3\n[data]\nname = 'wine'\n")
    again = config.load(text=config.dumps(cfg))
    assert again == cfg and cfg.rounds == 3 and cfg.data.name == "wine"


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(config.ConfigError) as e:
        config.load(text="[data]\nnum_client = 5\n")
    assert "unknown key 'data.num_client'" in str(e.value)
    assert "did you mean 'data.num_clients'" in str(e.value)
    with pytest.raises(config.ConfigError, match="unknown key 'rouns'.*did you mean 'rounds'"):
        config.load(text="rouns = 5\n")
    with pytest.raises(config.ConfigError, match="unknown key 'clients'"):
        config.load(text="[clients]\nlr = 0.1\n")


def test_bad_value_names_field_and_range():
    with pytest.raises(config.ConfigError, match=r"client\.lr: Input should be greater than 0 \(got -0.1\)"):
        config.load(text="[client]\nlr = -0.1\n")
    with pytest.raises(config.ConfigError, match=r"algorithm\.name: Input should be 'fedavg'"):
        config.load(text="[algorithm]\nname = 'fedsomething'\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(text="rounds = = 3\n")


def test_overrides():
    cfg = config.load(text="rounds = 3\n", overrides=["rounds=7", "algorithm.name=fedprox",
                                                      "algorithm.mu=0.5", "model.hidden=[8, 8]"])
    assert cfg.rounds == 7 and cfg.algorithm.name == "fedprox" and cfg.algorithm.mu == 0.5
    assert cfg.model.hidden == [8, 8]
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load(text="", overrides=["rounds"])
    with pytest.raises(config.ConfigError, match="unknown key 'client.lrr'"):
        config.load(text="", overrides=["client.lrr=0.1"])


def test_missing_file():
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load("no/such/file.toml")


def test_custom_weighting_per_client():
    cfg = config.load(text="[data]\nname='wine'\nnum_clients=3\n[algorithm]\nweighting=[1.0, 0.0, 2.0]\n")
    alg = config.build(cfg)[0]
    import torch
    w = alg.aggregator.weights([0, 2], torch.tensor([5.0, 7.0]))
    assert w.tolist() == [1.0, 2.0]
    bad = config.load(text="[data]\nname='wine'\nnum_clients=3\n[algorithm]\nweighting=[1.0]\n")
    with pytest.raises(config.ConfigError, match="3 clients"):
        config.build(bad)
