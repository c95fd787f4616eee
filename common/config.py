"""Run configuration: parsed once, at the boundary, into a frozen validated dataclass.

This is the only module that knows the hyphenated ``run_config`` keys of
``[tool.flwr.app.config]`` in pyproject.toml. Everything downstream receives a
:class:`RunConfig`; the training loop never sees a dict.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .privacy import check_accountant

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
# Strategies that only need the weighted SUM of the updates: the ones secure aggregation
# can serve. Order statistics / distances (FedMedian, trimmed mean, Krum...) need every
# site's update, which secure aggregation hides; a new strategy is refused until added here.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam")
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
    strategy: str = "fedavg"  # "fedavg", "fedprox", "fedadam"; robust: "fedmedian", "fedtrimmedavg", "krum"
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
    site_wait_timeout: float = 600.0  # seconds a round waits for min-sites connected sites, then the run stops
    count_noise_multiplier: float = 20.0  # σ of each site's one DP count of its train/test rows (ε ≈ 0.17 alone)
    eval_noise_multiplier: float = 0.0  # σ of each round's DP evaluation release; 0 = calibrated to the target (held-out side)
    eval_loss_clip: float = 4.0  # L: one record's loss counts at most L in the DP evaluation (nats)
    explain: bool = True  # after training, sites release feature importances of the final model
    explain_noise_multiplier: float = 3.0  # σ of that release (DP runs; one Gaussian, ε ≈ 1.28 alone at δ=1e-5)
    explain_clip: float = 0.5  # L2 bound C on one record's |contribution| vector, probability points
    secure_aggregation: bool = False  # SecAgg+: the server learns only the sum of the updates (docs/secure_aggregation.md)
    secagg_num_shares: float = 1.0  # neighbours a site secret-shares with: fraction (0, 1] of the sampled sites, or a count >= 3
    secagg_reconstruction_threshold: float = 0.5  # a secret is rebuilt from MORE than this fraction of its shares, in [0.5, 1]
    secagg_clipping_range: float = 8.0  # c: each coordinate of (num-examples / max-weight) x update is clipped to [-c, c]
    secagg_max_weight: float = 1000.0  # M: weight scale in rows; set near the largest site's training rows
    secagg_quantization_range: int = 4194304  # Q = 2^22 levels per coordinate; sites per round x Q < 2^32
    max_update_norm: float = 0.0  # reject an update moving the model by more than this (L2 over all arrays); 0 = off
    trimmed_beta: float = 0.2  # fedtrimmedavg: fraction cut at EACH end of every coordinate, in [0, 0.5)
    krum_byzantine: int = 0  # krum: f, faulty sites tolerated (Krum needs min-sites >= 2f + 3)
    audit_key: str = ""  # coordinator's Ed25519 audit key (PEM path); "" = ephemeral key for this run (docs/trust.md)
    resume: bool = False  # continue the interrupted run in out-dir from its checkpoint (docs/outputs.md, Resuming)

    def __post_init__(self) -> None:
        _positive_int(self, "num_server_rounds")
        _positive_int(self, "batch_size")
        _positive_int(self, "min_sites")
        _positive_int(self, "min_rows")
        _positive(self, "max_grad_norm")
        _positive(self, "local_epochs")
        _positive(self, "learning_rate")
        _positive(self, "round_timeout")
        _positive(self, "site_wait_timeout")
        _positive(self, "explain_noise_multiplier")
        _positive(self, "count_noise_multiplier")
        if self.eval_noise_multiplier < 0:
            _fail("eval_noise_multiplier", "a number >= 0 (0 = calibrated to the run's target)", self.eval_noise_multiplier)
        _positive(self, "eval_loss_clip")
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
        if self.max_update_norm < 0:
            _fail("max_update_norm", "a number >= 0 (0 = no bound)", self.max_update_norm)
        if not 0 <= self.trimmed_beta < 0.5:
            _fail("trimmed_beta", "a fraction in [0, 0.5)", self.trimmed_beta)
        if self.krum_byzantine < 0:
            _fail("krum_byzantine", "an integer >= 0", self.krum_byzantine)
        if self.strategy == "krum" and self.min_sites < 2 * self.krum_byzantine + 3:
            _fail("min_sites", f"at least 2 x krum-byzantine + 3 = {2 * self.krum_byzantine + 3} with strategy "
                  "'krum' (Krum tolerates f faulty sites among n > 2f + 2)", self.min_sites)
        self._check_secure_aggregation()
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

    def _check_secure_aggregation(self) -> None:
        shares = self.secagg_num_shares
        if not (0 < shares <= 1 or (shares >= 3 and float(shares).is_integer())):
            _fail("secagg_num_shares", "a fraction in (0, 1] of the sampled sites or a whole count >= 3", shares)
        if not 0.5 <= self.secagg_reconstruction_threshold <= 1:
            _fail("secagg_reconstruction_threshold", "a fraction in [0.5, 1] (a strict majority of the shares or more)",
                  self.secagg_reconstruction_threshold)
        _positive(self, "secagg_clipping_range")
        _positive(self, "secagg_max_weight")
        if not 2 <= self.secagg_quantization_range < 2**31:
            _fail("secagg_quantization_range", "an integer in [2, 2^31)", self.secagg_quantization_range)
        if not self.secure_aggregation:
            return
        if self.strategy not in SECAGG_STRATEGIES:
            raise ConfigError(
                f"secure-aggregation=true cannot be combined with strategy '{self.strategy}': it needs every site's "
                "update, and secure aggregation shows the server only their weighted sum. Use one of "
                f"{', '.join(SECAGG_STRATEGIES)}, or secure-aggregation=false.")
        if getattr(self, "max_update_norm", 0) > 0:
            raise ConfigError(
                "secure-aggregation=true cannot be combined with max-update-norm > 0: the coordinator never sees a "
                f"site's update, so it cannot bound its norm. Got max-update-norm={self.max_update_norm}; set it to 0.")

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


def parse_override(text: str) -> tuple[str, Any]:
    """A command-line ``-c KEY=VALUE`` with a TOML-typed value; a bare word is a string,
    as ``flwr run -c`` reads it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-c expects KEY=VALUE (e.g. -c num-server-rounds=5); got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def merge_overrides(items: Iterable[str], *, base: Mapping[str, Any] | None = None,
                    **fixed: Any) -> dict[str, Any]:
    """The run-config values a command sets, over :class:`RunConfig`'s defaults, checked.

    Layered, a later layer winning: ``base`` (hyphenated keys, e.g. a federation's own
    defaults), then each ``-c KEY=VALUE`` of ``items`` in order (:func:`parse_override`),
    then ``fixed`` (keyword names, ``_`` for ``-``; a ``None`` is skipped). The merged
    values are validated as one :class:`RunConfig` over the defaults.

    Returns:
        Every key that was set (hyphenated), with its value typed as RunConfig reads it
        (e.g. ``local-epochs=1`` as ``1.0``): what the command passes to ``flwr run``.
        ``RunConfig.from_run_config(result)`` is the run's configuration.

    Raises:
        ConfigError: a malformed ``-c``, an unknown key, or a value outside its rule.
    """
    if isinstance(items, str):
        raise TypeError("merge_overrides: items must be a list of 'KEY=VALUE' strings, not one string")
    values = dict(base or {})
    values.update(parse_override(text) for text in items)
    values.update({key.replace("_", "-"): value for key, value in fixed.items() if value is not None})
    typed = RunConfig.from_run_config(values).to_run_config()
    return {key: typed[key] for key in values}


STALL_MARGIN = 300.0  # seconds beyond the longest bounded wait a run may be in


def stall_limit(cfg: RunConfig) -> float:
    """How long a run may print nothing before the watchdog stops it as stuck: longer
    than any wait it can legitimately be in (a round's replies, ``round-timeout``; the
    sites a round needs, ``site-wait-timeout``), plus :data:`STALL_MARGIN`."""
    return max(cfg.round_timeout, cfg.site_wait_timeout) + STALL_MARGIN
