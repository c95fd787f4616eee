"""Run configuration: parsed once, at the boundary, into a frozen validated dataclass.

This is the only module that knows the hyphenated ``run_config`` keys of
``[tool.flwr.app.config]`` in pyproject.toml. Everything downstream receives a
:class:`RunConfig`; the training loop never sees a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .privacy import check_accountant

STRATEGIES = ("fedavg", "fedprox", "fedadam")
OPTIMIZERS = ("sgd", "adam")
BUILTIN_MODELS = ("mlp", "logreg")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a Candor run; each field maps to run-config key ``a-b``."""

    num_server_rounds: int = 5  # federated rounds
    dp: bool = True  # DP-SGD at every site (False = non-private baseline)
    target_epsilon: float = 3.0  # ε for the WHOLE run per site; 0 = use noise_multiplier
    target_delta: float = 0.0  # δ per site; 0 = automatic, well below 1/n (see privacy.default_delta)
    noise_multiplier: float = 0.0  # σ used as given when target_epsilon = 0
    max_grad_norm: float = 1.0  # per-record gradient clipping bound C (L2)
    accountant: str = "prv"  # "prv" (default, tight) or "rdp"
    batch_size: int = 32  # expected batch size; Poisson sample rate q = batch_size / n
    local_epochs: float = 3.0  # passes over the local training split per round (steps = epochs / q)
    learning_rate: float = 0.5  # local optimizer learning rate
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.0  # SGD momentum
    model: str = "mlp"  # "mlp", "logreg", or "package.module:factory" (see common.models)
    hidden: str = "64,32"  # hidden layer widths of the built-in MLP
    data_loader: str = ""  # "package.module:function" replacing the CSV pipeline (docs/plugins.md)
    strategy: str = "fedavg"  # "fedavg", "fedprox", "fedadam"
    proximal_mu: float = 0.01  # FedProx μ (the client adds the proximal term)
    server_learning_rate: float = 0.05  # FedAdam server step η
    fraction_train: float = 1.0  # fraction of connected sites sampled per round
    min_sites: int = 2  # sites needed to start a round
    test_fraction: float = 0.2  # share of each site's rows held out for evaluation
    min_rows: int = 20  # fewest usable rows a site may train on
    seed: int = 42  # seeds model init, splits, sampling and noise
    schema: str = ""  # path to the federation's schema file
    out_dir: str = ""  # run directory; "" = runs/<timestamp>
    sim_manifest: str = ""  # simulation only: JSON manifest of simulated sites
    round_timeout: float = 3600.0  # seconds to wait for replies in one round
    explain: bool = True  # after training, sites release feature importances of the final model
    explain_noise_multiplier: float = 3.0  # σ of that release (DP runs; one Gaussian, ε ≈ 1.28 alone at δ=1e-5)
    explain_clip: float = 0.5  # L2 bound C on one record's |contribution| vector, probability points

    def __post_init__(self) -> None:
        _positive_int(self, "num_server_rounds")
        _positive_int(self, "batch_size")
        _positive_int(self, "min_sites")
        _positive_int(self, "min_rows")
        _positive(self, "max_grad_norm")
        _positive(self, "local_epochs")
        _positive(self, "learning_rate")
        _positive(self, "round_timeout")
        _positive(self, "explain_noise_multiplier")
        _positive(self, "explain_clip")
        if self.target_epsilon < 0:
            _fail("target_epsilon", "a number >= 0 (0 = use noise-multiplier)", self.target_epsilon)
        if not 0 <= self.target_delta < 1:
            _fail("target_delta", "a number in [0, 1) (0 = automatic)", self.target_delta)
        if self.noise_multiplier < 0:
            _fail("noise_multiplier", "a number >= 0", self.noise_multiplier)
        if self.dp and self.target_epsilon == 0 and self.noise_multiplier == 0:
            raise ConfigError(
                "With dp=true, set either 'target-epsilon' (> 0, calibrates the noise for "
                "the whole run) or 'noise-multiplier' (> 0); both are 0."
            )
        check_accountant(self.accountant)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "strategy", STRATEGIES)
        if self.model not in BUILTIN_MODELS and ":" not in self.model:
            _fail("model", f"one of {BUILTIN_MODELS} or 'package.module:factory'", self.model)
        self.hidden_sizes  # validates
        if self.data_loader and ":" not in self.data_loader:
            _fail("data_loader", "'' or 'package.module:function'", self.data_loader)
        if not 0 < self.fraction_train <= 1:
            _fail("fraction_train", "a number in (0, 1]", self.fraction_train)
        if not 0 < self.test_fraction < 1:
            _fail("test_fraction", "a number in (0, 1)", self.test_fraction)
        if self.momentum < 0 or self.proximal_mu < 0 or self.server_learning_rate <= 0:
            raise ConfigError("'momentum' and 'proximal-mu' must be >= 0, 'server-learning-rate' > 0")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        try:
            sizes = tuple(int(s) for s in self.hidden.split(",") if s.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            _fail("hidden", "comma-separated positive layer widths like '64,32'", self.hidden)
        return sizes

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config`` (hyphenated keys).

        Raises:
            ConfigError: unknown key, wrong type, or a value outside its rule.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(
                    f"Unknown run-config key '{key}'. Known keys: {', '.join(sorted(known))}."
                )
            kwargs[known[key].name] = _coerce(key, known[key], value)
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The hyphenated run-config dict (round-trips through ``from_run_config``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"The '{key}' run-config parameter must be of type {kind.__name__}; got {value!r}."
    )


def _fail(name: str, rule: str, value: Any) -> None:
    raise ConfigError(f"The '{name.replace('_', '-')}' parameter must be {rule}. Got {value!r} instead.")


def _positive(cfg: RunConfig, name: str) -> None:
    if not getattr(cfg, name) > 0:
        _fail(name, "a number > 0", getattr(cfg, name))


def _positive_int(cfg: RunConfig, name: str) -> None:
    if getattr(cfg, name) < 1:
        _fail(name, "an integer >= 1", getattr(cfg, name))


def _choice(cfg: RunConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        _fail(name, f"one of {', '.join(choices)}", getattr(cfg, name))
