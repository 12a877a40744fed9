"""TOML experiment files, validated by pydantic, turned into objects.

``sections``: one model per section and ``Config``; ``files``: ``load`` (TOML text, ``--set``
overrides, validation with errors that name the key) and ``dumps``; ``assemble``: ``build`` a run
(algorithm, model, data, plan) from a config; ``aggregation``: the aggregator, the simulated
attack and the secure sum, with the checks that refuse what they cannot run with.
"""
from atoll.config.aggregation import build_aggregator  # noqa: F401
from atoll.config.assemble import build, build_data, runtime  # noqa: F401
from atoll.config.files import dumps, load, validate  # noqa: F401
from atoll.config.sections import (AggregatorConfig, AlgorithmConfig, AsyncConfig,  # noqa: F401
                                   AttackConfig, CheckpointConfig, ClientConfig, CommConfig,
                                   Config, DataConfig, DeployConfig, DevicesConfig, EvalConfig,
                                   ModelConfig, PrivacyConfig, RuntimeConfig, SamplingConfig,
                                   SecureConfig, WatermarkConfig)
from atoll.errors import ConfigError  # noqa: F401 (re-exported: atoll.config.ConfigError)
