"""The contract every strategy layer keeps, checked on each of them, and the stack's order.

A layer (``candor.server.wrapper.StrategyWrapper``) overrides only the ``Strategy``
methods it adds something to, forwards every other one to ``inner`` unchanged (same
arguments, the inner result returned as is), leaves Flower's ``start`` alone, and refuses
at construction an inner strategy it does not fit. ``assemble`` builds the one order.
"""

from __future__ import annotations

from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp.strategy import FedAvg, FedMedian, Strategy

from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.encoding import Encoder
from candor.common.schema import Schema
from candor.server.audit import AuditLog
from candor.server.audited import AuditedStrategy
from candor.server.checks import UpdateChecks
from candor.server.outputs import RunRecorder
from candor.server.recording import RecordingStrategy
from candor.server.site_wait import SiteWait
from candor.server.secagg import SecureAggregation
from candor.server.strategy import assemble, build_strategy
from candor.server.wrapper import StrategyWrapper, layers

# Flower's abstract interface: a method Flower adds later is in the contract at once.
METHODS = sorted(Strategy.__abstractmethods__)
ARGS = {  # stand-ins: a forwarding layer passes them on untouched
    "summary": (),
    "configure_train": (3, object(), object(), object()),
    "aggregate_train": (3, object()),
    "configure_evaluate": (3, object(), object(), object()),
    "aggregate_evaluate": (3, object()),
}


@pytest.fixture
def run_dir(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    recorder = RunRecorder(tmp_path, cfg=RunConfig(), schema=schema, feature_names=Encoder(schema).feature_names)
    return recorder, AuditLog(tmp_path, Ed25519PrivateKey.generate(), ephemeral=True)


def base() -> FedAvg:
    return FedAvg(min_train_nodes=3, min_available_nodes=3)


# Each layer, built around an inner strategy, and the methods it adds something to.
WRAPPERS = {
    RecordingStrategy: (lambda inner, rec, log: RecordingStrategy(inner, rec),
                        {"configure_train", "aggregate_train", "aggregate_evaluate"}),
    UpdateChecks: (lambda inner, rec, log: UpdateChecks(inner), {"configure_train", "aggregate_train"}),
    SecureAggregation: (lambda inner, rec, log: SecureAggregation(inner),
                        {"summary", "configure_train", "aggregate_train"}),
    AuditedStrategy: (lambda inner, rec, log: AuditedStrategy(inner, log, rec), {"configure_train", "aggregate_train"}),
    SiteWait: (lambda inner, rec, log: SiteWait(inner, min_train=1, min_evaluate=1, timeout=5.0),
               {"configure_train", "configure_evaluate", "aggregate_train", "aggregate_evaluate"}),
}


def overridden(cls: type) -> set[str]:
    return {m for m in METHODS if getattr(cls, m) is not getattr(StrategyWrapper, m)}


def forwards(wrapper: StrategyWrapper, method: str) -> bool:
    """Whether ``wrapper.method(...)`` calls ``inner.method`` once with the same arguments
    and returns its result unchanged."""
    result = object()
    with mock.patch.object(type(wrapper.inner), method, autospec=True, return_value=result) as inner_method:
        returned = getattr(wrapper, method)(*ARGS[method])
    calls = inner_method.call_args_list
    return returned is result and len(calls) == 1 and calls[0] == mock.call(wrapper.inner, *ARGS[method])


def test_the_base_implements_the_whole_interface_and_keeps_flowers_start():
    assert not StrategyWrapper.__abstractmethods__
    assert set(METHODS) == {"summary", "configure_train", "aggregate_train", "configure_evaluate",
                            "aggregate_evaluate"}
    assert StrategyWrapper.start is Strategy.start


@pytest.mark.parametrize("cls", list(WRAPPERS), ids=lambda c: c.__name__)
def test_each_layer_overrides_only_what_it_adds_and_keeps_flowers_start(cls):
    assert issubclass(cls, StrategyWrapper)
    assert overridden(cls) == WRAPPERS[cls][1]
    assert cls.start is Strategy.start  # Flower's loop drives the stack from the outermost layer


@pytest.mark.parametrize("cls, method", [(c, m) for c in WRAPPERS for m in METHODS if m not in WRAPPERS[c][1]],
                         ids=lambda x: getattr(x, "__name__", x))
def test_each_layer_forwards_every_method_it_does_not_override(cls, method, run_dir):
    recorder, log = run_dir
    wrapper = WRAPPERS[cls][0](base(), recorder, log)
    assert forwards(wrapper, method)


def test_the_contract_catches_a_layer_that_swallows_or_rewrites_a_call():
    class Swallows(StrategyWrapper):
        def configure_evaluate(self, server_round, arrays, config, grid):
            return []

    class Rewrites(StrategyWrapper):
        def aggregate_evaluate(self, server_round, replies):
            return super().aggregate_evaluate(server_round + 1, replies)

    assert overridden(Swallows) == {"configure_evaluate"}  # an added pass-through shows here
    assert not forwards(Swallows(base()), "configure_evaluate")
    assert not forwards(Rewrites(base()), "aggregate_evaluate")
    assert forwards(Rewrites(base()), "aggregate_train")


# --- the order, fixed in one place --------------------------------------------------------

@pytest.mark.parametrize("secure, guard", [(False, UpdateChecks), (True, SecureAggregation)])
def test_assemble_stacks_audit_recording_then_secagg_or_checks_then_the_strategy(secure, guard, run_dir):
    recorder, log = run_dir
    cfg = RunConfig(secure_aggregation=secure, min_sites=3)
    stack = assemble(cfg, build_strategy(cfg), recorder=recorder, audit=log)
    assert [type(layer) for layer in layers(stack)] == [AuditedStrategy, RecordingStrategy, SiteWait, guard, FedAvg]
    assert stack.secure_aggregation is secure  # the audit layer found (or not) the layer that hides updates


@pytest.mark.parametrize("build, fragment", [
    (lambda rec, log: StrategyWrapper(object()), "must wrap a Flower Message-API Strategy"),
    (lambda rec, log: RecordingStrategy(AuditedStrategy(base(), log, rec), rec), "must be the outermost layer"),
    (lambda rec, log: AuditedStrategy(AuditedStrategy(base(), log, rec), log, rec), "already contains a AuditedStrategy"),
    (lambda rec, log: RecordingStrategy(RecordingStrategy(base(), rec), rec), "already contains a RecordingStrategy"),
    (lambda rec, log: SecureAggregation(RecordingStrategy(base(), rec)), "must wrap the aggregation strategy itself"),
    (lambda rec, log: SecureAggregation(FedMedian(min_train_nodes=3, min_available_nodes=3)),
     "got 'FedMedian'"),
    (lambda rec, log: UpdateChecks(SecureAggregation(base())), "cannot wrap a layer that hides them"),
])
def test_a_layer_refuses_at_construction_what_it_does_not_fit(build, fragment, run_dir):
    with pytest.raises(TypeError) as err:
        build(*run_dir)
    assert fragment in str(err.value)
