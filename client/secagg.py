"""Secure aggregation at a site: a Flower mod on the site's train function.

With ``secure-aggregation = true`` the server (server/secagg.py) sends every training
round as the four SecAgg+ stages, all as ``train`` messages carrying a
``secaggplus_configs`` ConfigRecord. :func:`secagg_mod` is the mod the ClientApp attaches
to its train function only (``@app.train(mods=[secagg_mod])``: app-wide mods break
evaluate replies). It passes each stage to Flower's own ``secaggplus_mod``; at the
"collect masked vectors" stage that mod calls back into the site's ordinary train
function (``call_next``: DP-SGD, ledger append, the reply with the site's metrics), and
this module turns that Message-API reply into what the mod masks:

- the update is the model delta ``local - global`` in float64 (not the model: deltas are
  small, so they stay inside the clipping range), in the order of the global model's keys;
- the weight is the site's ``num-examples``.

The mod quantises ``(n / max_weight) x delta``, adds the pairwise and private masks and
empties every ArrayRecord; the reply that leaves the site carries only the masked vector,
the clear metrics (num-examples, ε, δ, σ, q, steps, train-loss, and ``secagg-clipped``,
the number of coordinates the site had to clip) and the ``candor`` ConfigRecord (site
name, accountant, mechanism history). A site that refuses to train (budget, schema) answers
with its refusal; the server treats it as a dropout and removes its masks.

A training request that is not a SecAgg+ stage is passed on unchanged when the run has
``secure-aggregation = false``, and refused when it has ``true``: the site never sends its
update in the clear to a run that promised secure aggregation.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from candor.common.config import RunConfig
from candor.common.errors import ConfigError

from .context import refusal

logger = logging.getLogger(__name__)

__all__ = ["secagg_mod"]

CLIPPED_KEY = "secagg-clipped"
KEEP = ("metrics", "candor", RECORD_KEY_CONFIGS)  # everything else is dropped from the reply


class _Refused(Exception):
    """The train function answered with an error (e.g. a budget refusal)."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod for the site's train function: answer SecAgg+ stages, refuse clear updates.

    ``call_next`` is the site's ordinary Message-API train function; it runs once per
    secure round, at the "collect masked vectors" stage, on the training request as the
    server's strategy built it (with the SecAgg+ ConfigRecord beside it, which it ignores).
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        refused = _plain_training_refused(context)
        return call_next(msg, context) if refused is None else refusal(msg, refused)

    def masked_update(inner_msg: Message, ctx: Context) -> Message:
        reply = call_next(inner_msg, ctx)
        if reply.has_error():
            raise _Refused(reply)
        return _as_fitres(inner_msg, reply, ctx)

    try:
        out = secaggplus_mod(msg, context, masked_update)
    except _Refused as refused:
        return Message(refused.reply.error, reply_to=msg)
    content = RecordDict({k: out.content[k] for k in KEEP if k in out.content})
    return Message(content=content, reply_to=msg)


def _plain_training_refused(context: Context) -> ConfigError | None:
    """The refusal a site sends when a run with secure aggregation asks for a clear update."""
    try:
        secure = RunConfig.from_run_config(context.run_config).secure_aggregation
    except ConfigError as err:
        return err
    if secure:
        return ConfigError("this run has secure-aggregation=true, but the training request is not a SecAgg+ "
                           "stage: the site does not send its update in the clear")
    return None


def _as_fitres(msg: Message, reply: Message, context: Context) -> Message:
    """The Message-API reply as the legacy FitRes the mod masks: (delta, num-examples)."""
    glob, local = msg.content["arrays"], reply.content["arrays"]
    if list(local.keys()) != list(glob.keys()):
        raise ValueError("the trained model's arrays do not match the global model's; cannot form the update")
    delta = [local[k].numpy().astype(np.float64) - glob[k].numpy().astype(np.float64) for k in glob]
    metrics = reply.content["metrics"]
    n = int(metrics["num-examples"])
    clipped = _clipped(delta, n, context)
    if clipped:
        logger.warning("secure aggregation: %d coordinates of this site's weighted update exceed the clipping "
                       "range and are clipped; raise 'secagg-clipping-range' or 'secagg-max-weight'", clipped)
    content = fitres_to_recorddict(
        FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(delta), num_examples=n, metrics={}),
        keep_input=False)
    content["metrics"] = MetricRecord({**dict(metrics), CLIPPED_KEY: clipped})
    content["candor"] = reply.content["candor"]
    return Message(content=content, reply_to=msg)


def _clipped(delta: list[np.ndarray], n: int, context: Context) -> int:
    """Coordinates of ``(n / max_weight) x delta`` outside [-c, c] (the mod clips them)."""
    state = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord())
    c, m, q = float(state["clipping_range"]), float(state["max_weight"]), int(state["target_range"])
    ratio = round(n / m * q) / q
    return int(sum(np.count_nonzero(np.abs(d * ratio) > c) for d in delta))

