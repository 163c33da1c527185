from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.config import config_from_dict, config_to_dict, config_to_toml, load_config
from fedprune.errors import ConfigError


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.data.dataset == "digits"
    assert cfg.clients_per_round() == cfg.data.num_clients


def test_overrides_are_typed() -> None:
    cfg = load_config(overrides=["pruning.final_sparsity=0.9", "train.optimizer=adam", "seed=3"])
    assert cfg.pruning.final_sparsity == 0.9
    assert cfg.train.optimizer == "adam"
    assert cfg.seed == 3


def test_toml_file_and_flag_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("seed = 5\n[federation]\nrounds = 7\n[data]\nnum_clients = 4\n")
    cfg = load_config(f, ["federation.rounds=8"], {"federation.rounds": 9})
    assert (cfg.seed, cfg.federation.rounds, cfg.data.num_clients) == (5, 9, 4)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pruning.final_sparsty=0.9", "did you mean 'pruning.final_sparsity'"),
        ("pruning.final_sparsity=1.0", "pruning.final_sparsity must be in [0, 1)"),
        ("pruning.final_sparsity=-0.1", "pruning.final_sparsity"),
        ("train.batch_size=abc", "train.batch_size must be an integer"),
        ("train.batch_size=1.5", "train.batch_size must be an integer"),
        ("train.lr=0", "train.lr must be in (0, 1000], got 0.0"),
        ("method=fedsparsify-glob", "did you mean 'fedsparsify-global'"),
        ("federation.clients_per_round=50", "there are only 10 clients"),
        ("data.alpha=0", "data.alpha must be in (0, "),
        ("federation.local_eval=maybe", "must be true or false"),
        ("noequals", "key=value"),
        ("data=3", "data must be a table"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_round_trip_through_toml_and_dict() -> None:
    import tomllib

    cfg = load_config(overrides=["pruning.final_sparsity=0.95", "data.partition=dirichlet"])
    again = config_from_dict(tomllib.loads(config_to_toml(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_fraction_of_clients() -> None:
    cfg = load_config(overrides=["data.num_clients=100", "federation.clients_per_round=0.1"])
    assert cfg.clients_per_round() == 10


def test_train_settings_cover_every_train_key() -> None:
    """TrainSettings is what [train] describes for one round: one mapping, all keys used."""
    from dataclasses import fields

    from fedprune.core.training import TrainSettings

    cfg = load_config(
        overrides=[
            "train.local_epochs=3",
            "train.batch_size=7",
            "train.lr=0.3",
            "train.optimizer='adam'",
            "train.momentum=0.5",
            "train.weight_decay=0.01",
            "train.prox_mu=0.2",
        ]
    )
    s = TrainSettings.from_config(cfg.train, lr=0.15)
    assert (s.epochs, s.batch_size, s.lr, s.optimizer) == (3, 7, 0.15, "adam")
    assert (s.momentum, s.weight_decay, s.prox_mu) == (0.5, 0.01, 0.2)
    assert TrainSettings.from_config(cfg.train).lr == 0.3
    # every [train] key is either a setting or the per-round decay the server applies
    keys = {f.name for f in fields(cfg.train)}
    assert len(fields(TrainSettings)) == len(keys) - 1 and "lr_decay" in keys
