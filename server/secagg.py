"""Secure aggregation: the server learns only the weighted sum of the sites' updates.

:class:`SecureAggregation` wraps a FedAvg-family Message-API strategy (FedAvg, FedProx,
FedAdam; a :class:`~candor.server.wrapper.StrategyWrapper` that refuses any other) and
runs every training round as Flower's SecAgg+ protocol (Bell et al., CCS
2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"; Bonawitz et al.,
CCS 2017). The sites run Flower's own ``secaggplus_mod`` (see client/secagg.py); this module
is the server half, written against the Message API instead of Flower's legacy
``SecAggPlusWorkflow`` (which needs a ``LegacyContext`` and legacy strategy). It reuses
Flower's primitives (Shamir shares, ECDH, the mask generator, quantisation) and mirrors
the workflow's four stages:

==================  ===================================  ==============================
stage               sent by the server                   returned by a site
==================  ===================================  ==============================
0 setup             protocol parameters                  two public keys
1 share keys        its neighbours' public keys          encrypted secret shares
2 collect (train)   the model, config, forwarded shares  masked update + clear metrics
3 unmask            which neighbours survived            shares of seeds / dead keys
==================  ===================================  ==============================

Stages 0-1 run inside :meth:`configure_train`, which returns the stage-2 messages;
``Strategy.start`` sends them like any training round (same timeout); stage 3 runs inside
:meth:`aggregate_train`, which then hands ONE message carrying the securely computed
weighted mean to the wrapped strategy's ``aggregate_train``. The wrapped strategy (and
the recording and audit layers outside this one) never receives a site's update: a site's reply
carries only the masked vector, its clear metrics (num-examples, ε, δ, σ, q, steps,
train-loss) and its ``candor`` ConfigRecord (site name, accountant, mechanism history).

What a site masks is its model delta ``Δ_i = local_i - global`` (float64), multiplied by
the quantised weight ``r_i = round(n_i / M * Q) / Q`` and clipped to ``[-c, c]``, with
``M = max_weight``, ``c = clipping_range``, ``Q = quantization_range``; ``r_i * Q`` is
masked and summed with it. Dequantising the secure sum and dividing by the securely
summed weight gives ``Σ r_i Δ_i / Σ r_i``: FedAvg's example-weighted mean of the deltas.
Error against exact FedAvg of the same deltas (:func:`error_bound`): stochastic rounding
moves each coordinate of each site's value by less than one step ``2c / Q``; the weights
are exact up to ``M / (2 Q n_i)`` relative. Values that clip (``n_i |Δ_i| > c M``) are
counted by the site and reported as the metric ``secagg-clipped``.

Each round's record in ``secure_aggregation.json`` pins the aggregate by
``candor.common.hashing.hash_arrays`` (``aggregate_sha256``); the audit layer outside asks
for the same value through :meth:`SecureAggregation.aggregate_sha256`
(:class:`~candor.server.wrapper.HidesUpdates`), so both files name the aggregate alike.

Security notes (see docs/secure_aggregation.md): honest-but-curious server; a secret is
rebuilt only from a strict majority of its holders; at least 3 sites per round and at
least ``threshold`` (>= 2) masked vectors in every sum.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from candor.common.atomic import write_json_atomic
from candor.common.config import RunConfig
from candor.common.errors import CandorError, message
from candor.common.hashing import hash_arrays

from .fedadam import FedAdam
from .wrapper import StrategyWrapper

logger = logging.getLogger(__name__)

__all__ = ["MIN_SITES", "RECORD_FILE", "SecureAggregation", "SecureAggregationError", "error_bound", "num_shares_for",
           "rounding_bound", "threshold_for", "weight_shift"]

MODULUS_RANGE = 2**32  # mask modulus; Flower's pseudo_rand_gen draws masks below it
WEIGHT_KEY = "num-examples"  # the clear weight every site reports
CLIPPED_KEY = "secagg-clipped"  # coordinates a site had to clip to the clipping range
RECORD_FILE = "secure_aggregation.json"  # the per-round record, in the run directory
MIN_SITES = 3  # with 2 sites in a sum, each could subtract its own update from it
MEAN_STRATEGIES = (FedAvg, FedProx, FedAdam)  # FedAdam: Candor's (server/fedadam.py); their aggregate is FedAvg's weighted mean (then a server step)


class SecureAggregationError(CandorError):
    """A secure-aggregation round cannot produce a trustworthy sum."""


def num_shares_for(setting: float, num_sites: int) -> int:
    """Shares per secret (= neighbours of a site, itself included) for ``num_sites`` sites.

    ``setting`` <= 1 is a fraction of the sampled sites, > 1 a count; the result is odd
    (a symmetric ring of neighbours) unless every site is a neighbour, and at least 3.
    """
    shares = round(setting * num_sites) if setting <= 1 else int(setting)
    if shares < num_sites and shares % 2 == 0:
        shares += 1
    if shares < 3 or shares > num_sites:
        shares = num_sites
    return shares


def threshold_for(setting: float, num_shares: int) -> int:
    """Shares needed to rebuild a secret: the smallest integer > ``setting * num_shares``
    (``setting`` in [0.5, 1]), at most ``num_shares`` and at least 2. With 0.5 it is a strict
    majority, so a server that lies about who dropped out cannot collect both a site's
    mask seed and its key from the honest holders (Bonawitz et al. 2017, §4)."""
    return max(2, min(num_shares, math.floor(setting * num_shares) + 1))


def rounding_bound(weights: list[float], *, clipping_range: float, max_weight: float,
                   quantization_range: int) -> float:
    """Worst-case error per coordinate from quantising the values (nothing clipped).

    Site i's value ``r_i Δ_i`` is stochastically rounded to a grid of step ``2c/Q``
    (error < one step, zero in expectation); the sum of N such errors is divided by
    ``Σ r_i``: the bound is ``N (2c/Q) / Σ r_i ≈ 2 c M N / (Q Σ n_i)``.
    """
    q = quantization_range
    return len(weights) * (2 * clipping_range / q) / sum(round(n / max_weight * q) / q for n in weights)


def weight_shift(weights: list[float], *, max_weight: float, quantization_range: int) -> float:
    """``Σ_i |w'_i - w_i|`` between the quantised weights ``round(n_i Q / M) / Σ`` and ``n_i / Σ n``."""
    q = quantization_range
    ratios = [round(n / max_weight * q) for n in weights]
    return sum(abs(r / sum(ratios) - n / sum(weights)) for r, n in zip(ratios, weights))


def error_bound(weights: list[float], *, max_abs_delta: float, clipping_range: float, max_weight: float,
                quantization_range: int) -> float:
    """Worst-case |secure mean - exact example-weighted mean| of the deltas, per coordinate,
    when nothing clipped: :func:`rounding_bound` plus ``max_abs_delta`` x :func:`weight_shift`.
    float64 arithmetic adds nothing visible; the cast of the new model to float32 adds half
    an ulp of each parameter."""
    return (rounding_bound(weights, clipping_range=clipping_range, max_weight=max_weight,
                           quantization_range=quantization_range)
            + max_abs_delta * weight_shift(weights, max_weight=max_weight, quantization_range=quantization_range))


@dataclass
class _Round:
    """What the server holds during one secure round (public values only)."""

    number: int
    arrays: ArrayRecord  # the global model this round started from
    train: dict[int, Message]  # node -> the training message the wrapped strategy built
    num_shares: int = 0
    threshold: int = 0
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    keyed: set[int] = field(default_factory=set)  # completed share-keys: their masks may be in the sum
    seconds: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, list[int]] = field(default_factory=dict)


class SecureAggregation(StrategyWrapper):
    """Runs the training rounds of ``inner`` (FedAvg, FedProx or FedAdam) as SecAgg+.

    Args:
        inner: the Message-API strategy that samples sites, configures training and turns
            the (securely computed) mean into the next global model. It must be the
            aggregation strategy itself (a layer between would see only the mean), one of
            FedAvg, FedProx, FedAdam, sampling at least :data:`MIN_SITES` sites.
        num_shares: neighbours each site secret-shares with (itself included): a fraction
            in (0, 1] of the sampled sites, or a count >= 3.
        reconstruction_threshold: a secret is rebuilt from more than this fraction of its
            shares, in [0.5, 1].
        clipping_range: c; each coordinate of ``(n_i / M) * Δ_i`` is clipped to [-c, c].
        max_weight: M, the weight scale (rows); set it near the largest site's row count.
        quantization_range: Q levels per coordinate; (sites in a round) x Q < 2^32.
        timeout: seconds to wait for the replies of each key-exchange and unmask stage.
        log_path: where the per-round record (``secure_aggregation.json``) is written.

    Raises:
        TypeError: ``inner`` is a wrapper, or not one of FedAvg, FedProx, FedAdam.
        ValueError: ``inner`` may sample fewer than 3 sites, or ``quantization_range`` is
            outside (0, 2^31).
    """

    def __init__(self, inner: Strategy, *, num_shares: float = 1.0, reconstruction_threshold: float = 0.5,
                 clipping_range: float = 8.0, max_weight: float = 1000.0, quantization_range: int = 2**22,
                 timeout: float | None = None, log_path: Any = None) -> None:
        super().__init__(inner)
        if type(inner) not in MEAN_STRATEGIES:
            raise TypeError(message(
                "SecureAggregation(inner)", "must wrap the aggregation strategy itself, one of "
                + ", ".join(t.__name__ for t in MEAN_STRATEGIES) + ": the server learns only the weighted mean of "
                "the updates, and a layer between would see only that mean", got=type(inner).__name__,
                fix="Put other layers outside it (candor.server.strategy.assemble)."))
        floor = min(inner.min_train_nodes, inner.min_available_nodes)
        if floor < MIN_SITES:
            raise ValueError(message(
                "SecureAggregation(inner)", f"secure aggregation needs at least {MIN_SITES} sites per round (with 2, "
                "each site could subtract its own update from the sum): the inner strategy's min_train_nodes and "
                "min_available_nodes must be >= 3", got=floor,
                fix="Build it with candor.server.strategy.build_strategy, which raises 'min-sites' to 3."))
        if not 0 < quantization_range < 2**31:
            raise ValueError(message("SecureAggregation(quantization_range)", "must be in (0, 2^31)",
                                     got=quantization_range))
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.clipping_range = float(clipping_range)
        self.max_weight = float(max_weight)
        self.quantization_range = int(quantization_range)
        self.timeout = timeout
        self.log_path = log_path
        self.records: list[dict[str, Any]] = []
        self._grid: Grid | None = None
        self._round: _Round | None = None

    @classmethod
    def from_config(cls, inner: Strategy, cfg: RunConfig, **kwargs: Any) -> SecureAggregation:
        return cls(inner, num_shares=cfg.secagg_num_shares, reconstruction_threshold=cfg.secagg_reconstruction_threshold,
                   clipping_range=cfg.secagg_clipping_range, max_weight=cfg.secagg_max_weight,
                   quantization_range=cfg.secagg_quantization_range, timeout=cfg.round_timeout, **kwargs)

    def summary(self) -> None:
        logger.info("SecAgg+ over %s: shares %s, threshold > %s of them, c = %g, M = %g, Q = %d",
                    type(self.inner).__name__, self.num_shares, self.reconstruction_threshold,
                    self.clipping_range, self.max_weight, self.quantization_range)
        super().summary()

    def aggregate_sha256(self, server_round: int) -> str | None:
        """``hash_arrays`` of the secure mean of ``server_round`` (its record's
        ``aggregate_sha256``), or ``None`` if the round was skipped. The audit layer's
        question (:class:`~candor.server.wrapper.HidesUpdates`)."""
        return next((r.get("aggregate_sha256") for r in reversed(self.records) if r["round"] == server_round), None)

    # --- stages 0 and 1, then the stage-2 (training) messages -------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        train = {m.metadata.dst_node_id: m for m in super().configure_train(server_round, arrays, config, grid)}
        self._round = rnd = _Round(number=server_round, arrays=arrays, train=train)
        if not train:
            return []
        sampled = list(train)
        if len(sampled) < MIN_SITES:
            raise SecureAggregationError(
                f"secure aggregation needs at least 3 sites per round (with 2, each site could subtract "
                f"its own update from the sum); round {server_round} sampled {len(sampled)}. Raise "
                "'min-sites' to 3 or more.")
        if len(sampled) * self.quantization_range >= MODULUS_RANGE:
            raise SecureAggregationError(
                f"{len(sampled)} sites x secagg-quantization-range {self.quantization_range} reaches 2^32: the "
                f"secure sum would wrap around. Lower 'secagg-quantization-range' below {MODULUS_RANGE // len(sampled)}.")
        rnd.num_shares = num_shares_for(self.num_shares, len(sampled))
        rnd.threshold = threshold_for(self.reconstruction_threshold, rnd.num_shares)
        order = sampled[:]
        random.SystemRandom().shuffle(order)
        half = rnd.num_shares >> 1
        rnd.neighbours = {nid: {order[(i + k) % len(order)] for k in range(-half, half + 1)}
                          for i, nid in enumerate(order)}

        # Stage 0: protocol parameters out, public keys back.
        setup = ConfigRecord({
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(sampled), Key.SHARE_NUMBER: rnd.num_shares,
            Key.THRESHOLD: rnd.threshold, Key.CLIPPING_RANGE: self.clipping_range,
            Key.TARGET_RANGE: self.quantization_range, Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: self.max_weight,
        })
        replies = self._exchange(rnd, "setup", {nid: ConfigRecord(dict(setup)) for nid in sampled})
        for nid, res in replies.items():
            rnd.public_keys[nid] = (cast(bytes, res[Key.PUBLIC_KEY_1]), cast(bytes, res[Key.PUBLIC_KEY_2]))
        if not self._enough(rnd, set(rnd.public_keys), "setup"):
            return []

        # Stage 1: each site gets its live neighbours' public keys, returns encrypted shares.
        keyed_before = set(rnd.public_keys)
        messages = {}
        for nid in keyed_before:
            record = ConfigRecord({str(j): list(rnd.public_keys[j]) for j in rnd.neighbours[nid] & keyed_before})
            record[Key.STAGE] = Stage.SHARE_KEYS
            messages[nid] = record
        replies = self._exchange(rnd, "share_keys", messages)
        rnd.keyed = set(replies)
        if not self._enough(rnd, rnd.keyed, "share keys"):
            return []
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in rnd.keyed}
        for src, res in replies.items():
            for dst, ciphertext in zip(cast(list[int], res[Key.DESTINATION_LIST]),
                                       cast(list[bytes], res[Key.CIPHERTEXT_LIST]), strict=True):
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)

        # Stage 2 is the training message itself, plus the shares addressed to the site.
        out = []
        for nid in sorted(rnd.keyed):
            original = train[nid]
            content = RecordDict(dict(original.content.items()))  # per-site copy; records are shared
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: forward[nid][1],
                Key.SOURCE_LIST: forward[nid][0]})
            out.append(Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN,
                               group_id=str(server_round)))
        rnd.seconds["train_sent"] = time.monotonic()
        return out

    # --- stage 3 and the secure mean --------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round
        if rnd is None or rnd.number != server_round:
            raise SecureAggregationError(f"aggregate_train for round {server_round} without its configure_train")
        if "train_sent" in rnd.seconds:
            rnd.seconds["collect"] = time.monotonic() - rnd.seconds.pop("train_sent")
        replies = [m for m in replies if not m.has_error() and m.metadata.src_node_id in rnd.keyed]
        masked = {m.metadata.src_node_id: m for m in replies}
        summed = set(masked)
        rnd.dropped["collect"] = sorted(rnd.keyed - summed)
        if not replies or not self._enough(rnd, summed, "collect"):
            self._finish(rnd, None, replies, note="round skipped: too few masked updates")
            return None, None
        shapes = [(1,)] + [tuple(rnd.arrays[k].shape) for k in rnd.arrays]
        vector: list[np.ndarray] | None = None
        for nid in sorted(summed):
            parts = [bytes_to_ndarray(b) for b in cast(list[bytes], masked[nid].content.config_records[
                RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])]
            if [tuple(p.shape) for p in parts] != [tuple(s) for s in shapes]:
                raise SecureAggregationError(f"node {nid} returned a masked vector of the wrong shape")
            vector = parts if vector is None else [a + b for a, b in zip(vector, parts)]
        assert vector is not None
        vector = [v % MODULUS_RANGE for v in vector]

        # Stage 3: survivors send shares of the live sites' mask seeds and of the dead sites' keys.
        start = time.monotonic()
        dead = rnd.keyed - summed
        messages = {nid: ConfigRecord({Key.STAGE: Stage.UNMASK,
                                       Key.ACTIVE_NODE_ID_LIST: sorted(rnd.neighbours[nid] & summed),
                                       Key.DEAD_NODE_ID_LIST: sorted(rnd.neighbours[nid] & dead)})
                    for nid in summed}
        unmask = self._exchange(rnd, "unmask", messages)
        shares: dict[int, list[bytes]] = {nid: [] for nid in summed | dead}
        for res in unmask.values():
            for owner, share in zip(cast(list[int], res[Key.NODE_ID_LIST]), cast(list[bytes], res[Key.SHARE_LIST]),
                                    strict=True):
                if owner in shares:
                    shares[owner].append(share)
        short = sorted(nid for nid, s in shares.items() if len(s) < rnd.threshold)
        if short:
            self._finish(rnd, None, replies, note=f"round skipped: too few shares to unmask nodes {short}")
            logger.error("secure aggregation round %d: too few shares (< %d) to remove the masks of nodes %s; "
                         "the round's updates are discarded", server_round, rnd.threshold, short)
            return None, None
        dims = [tuple(v.shape) for v in vector]
        for nid in sorted(summed):
            seed = combine_shares(shares[nid])
            vector = [v - m for v, m in zip(vector, pseudo_rand_gen(seed, MODULUS_RANGE, dims))]
        for nid in sorted(dead):
            sk1 = bytes_to_private_key(combine_shares(shares[nid]))
            for other in sorted(rnd.neighbours[nid] & summed):
                key = generate_shared_key(sk1, bytes_to_public_key(rnd.public_keys[other][0]))
                mask = pseudo_rand_gen(key, MODULUS_RANGE, dims)
                sign = 1 if nid > other else -1  # `other` added the mask if other > nid, else subtracted it
                vector = [v + sign * m for v, m in zip(vector, mask)]
        vector = [v % MODULUS_RANGE for v in vector]
        rnd.seconds["unmask"] = time.monotonic() - start

        weight_sum, values = int(vector[0][0]), vector[1:]
        clear = {nid: int(masked[nid].content.metric_records["metrics"][WEIGHT_KEY]) for nid in summed}
        expected = sum(round(n / self.max_weight * self.quantization_range) for n in clear.values())
        if weight_sum != expected:
            raise SecureAggregationError(
                f"round {server_round}: the securely summed weight ({weight_sum}) differs from the sites' clear "
                f"num-examples ({expected} after quantisation): "
                + ("the sum wrapped around 2^32; raise 'secagg-max-weight'" if expected >= MODULUS_RANGE
                   else "a site reported a weight that is not the one it masked") + ".")
        mean = dequantize(values, self.clipping_range, self.quantization_range)
        offset = -(len(summed) - 1) * self.clipping_range
        scale = self.quantization_range / weight_sum
        delta = [(m + offset) * scale for m in mean]
        aggregate = ArrayRecord({k: Array(np.asarray(rnd.arrays[k].numpy() + d).astype(rnd.arrays[k].numpy().dtype))
                                 for k, d in zip(rnd.arrays, delta)})

        # The wrapped strategy turns the mean into the next model (FedAdam's server step...).
        carrier = Message(content=RecordDict({"arrays": aggregate,
                                              "metrics": MetricRecord({WEIGHT_KEY: sum(clear.values())})}),
                          dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = super().aggregate_train(server_round, [carrier])
        metrics = self._train_metrics(replies)
        clipped = {nid: int(masked[nid].content.metric_records["metrics"].get(CLIPPED_KEY, 0)) for nid in summed}
        if any(clipped.values()):
            logger.warning("secure aggregation round %d: %d coordinates were clipped to the clipping range at "
                           "some site; the mean is biased. Raise 'secagg-clipping-range' or "
                           "'secagg-max-weight' (n x |update| must stay below their product).",
                           server_round, sum(clipped.values()))
        self._finish(rnd, aggregate, replies, weights=clear, clipped=clipped)
        return arrays, metrics

    # --- helpers ------------------------------------------------------------------------
    def _train_metrics(self, replies: list[Message]) -> MetricRecord | None:
        """The inner strategy's aggregate of the sites' clear metrics."""
        if not replies:
            return None
        return self.inner.train_metrics_aggr_fn([m.content for m in replies], self.inner.weighted_by_key)

    def _exchange(self, rnd: _Round, stage: str, records: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """Send one stage's records; the SecAgg+ replies of the sites that answered."""
        assert self._grid is not None
        start = time.monotonic()
        messages = [Message(content=RecordDict({RECORD_KEY_CONFIGS: record}), dst_node_id=nid,
                            message_type=MessageType.TRAIN, group_id=str(rnd.number))
                    for nid, record in records.items()]
        out: dict[int, ConfigRecord] = {}
        for msg in self._grid.send_and_receive(messages, timeout=self.timeout):
            if msg.has_error():
                logger.warning("secure aggregation round %d, stage %s: node %d failed: %s",
                               rnd.number, stage, msg.metadata.src_node_id, msg.error.reason)
                continue
            if msg.metadata.src_node_id in records:
                out[msg.metadata.src_node_id] = msg.content.config_records[RECORD_KEY_CONFIGS]
        rnd.seconds[stage] = time.monotonic() - start
        rnd.dropped[stage] = sorted(set(records) - set(out))
        return out

    def _enough(self, rnd: _Round, alive: set[int], stage: str) -> bool:
        """Every live site still has >= threshold live neighbours (itself included)."""
        for nid in alive:
            if len(rnd.neighbours[nid] & alive) < rnd.threshold:
                logger.error("secure aggregation round %d, after %s: node %d has %d live neighbours, fewer than "
                             "the threshold %d; the round is skipped", rnd.number, stage, nid,
                             len(rnd.neighbours[nid] & alive), rnd.threshold)
                return False
        return len(alive) >= max(2, rnd.threshold)

    def _finish(self, rnd: _Round, aggregate: ArrayRecord | None, replies: list[Message], *,
                weights: dict[int, int] | None = None, clipped: dict[int, int] | None = None, note: str = "") -> None:
        sites = {m.metadata.src_node_id: str(m.content.config_records.get("candor", {}).get(
            "site", m.metadata.src_node_id)) for m in replies}
        info: dict[str, Any] = {
            "round": rnd.number,
            "sampled": len(rnd.train),
            "summed_sites": sorted(sites[n] for n in (weights or {})),
            "dropped_nodes": rnd.dropped,
            "num_shares": rnd.num_shares,
            "threshold": rnd.threshold,
            "clipping_range": self.clipping_range,
            "max_weight": self.max_weight,
            "quantization_range": self.quantization_range,
            "seconds": {k: round(v, 4) for k, v in rnd.seconds.items() if k != "train_sent"},
        }
        if aggregate is not None and weights:
            info["total_weight"] = sum(weights.values())
            info["clipped_coordinates"] = sum((clipped or {}).values())
            info["rounding_error_bound"] = rounding_bound(
                list(weights.values()), clipping_range=self.clipping_range, max_weight=self.max_weight,
                quantization_range=self.quantization_range)
            info["weight_shift"] = weight_shift(list(weights.values()), max_weight=self.max_weight,
                                                quantization_range=self.quantization_range)
            info["aggregate_sha256"] = hash_arrays(aggregate)
        if note:
            info["note"] = note
        self.records.append(info)
        if self.log_path is not None:
            write_json_atomic(self.log_path, {"protocol": "SecAgg+ (Flower secaggplus_mod, Candor server)",
                                              "rounds": self.records})
        self._round = None

