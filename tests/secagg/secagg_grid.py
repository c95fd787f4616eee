"""An in-process Grid for the SecAgg+ tests: the real server wrapper talks to a Flower
ClientApp whose train function carries the real site mod (``candor.client.secagg.secagg_mod``),
with every message serialised to protobuf bytes and back on the way, as on a SuperLink.
Sites train by adding a fixed delta (:class:`FakeSite`: the mod's ``call_next``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid

from candor.client.secagg import secagg_mod

SHAPES = {"0.weight": (8, 5), "0.bias": (8,), "2.weight": (1, 8), "2.bias": (1,)}


def initial_arrays(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(0, 0.5, s).astype(np.float32)) for k, s in SHAPES.items()})


@dataclass
class FakeSite:
    """A site whose training adds ``scale * N(0, 1)`` (fixed per round) to every parameter."""

    name: str
    num_examples: int
    scale: float = 0.05
    refuse_rounds: set[int] = field(default_factory=set)
    seed: int = 0
    trained: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # round -> local model (test's view)
    configs: dict[int, dict] = field(default_factory=dict)  # round -> train config received

    def train(self, msg: Message, context: Context) -> Message:
        r = int(msg.content["config"]["server-round"])
        self.configs[r] = dict(msg.content["config"])
        if r in self.refuse_rounds:
            return Message(Error(code=4001, reason=f"site '{self.name}' refuses round {r}"), reply_to=msg)
        rng = np.random.default_rng([self.seed, r])
        glob = msg.content["arrays"]
        local = {k: (glob[k].numpy() + self.scale * rng.standard_normal(glob[k].shape)).astype(np.float32)
                 for k in glob}
        self.trained[r] = local
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
            "metrics": MetricRecord({"num-examples": self.num_examples, "train-loss": 0.5, "epsilon": 1.25,
                                     "delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 30}),
            "candor": ConfigRecord({"site": self.name, "accountant": "prv"}),
        })
        return Message(content=content, reply_to=msg)


def site_app(sites: dict[int, FakeSite]) -> ClientApp:
    """A ClientApp as Candor's sites run it: ``secagg_mod`` on the train function only;
    node ``i`` trains as ``sites[i]``."""
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        return sites[context.node_id].train(msg, context)

    return app


def stage_of(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs[Key.STAGE]) if configs is not None else "plain"


def _wire(msg: Message) -> Message:
    """Serialise to bytes and back, as a message crossing the SuperLink does."""
    proto = ProtoMessage()
    proto.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


class LoopbackGrid(Grid):
    """Node ``i`` is ``sites[i]``; messages go to ``app`` (default :func:`site_app`).

    ``drop`` maps a stage name ("setup", "share_keys", "collect_masked_vectors", "unmask")
    to the nodes that never answer it (a dropout). ``received`` holds every reply the
    server got, ``sent`` every message it sent.
    """

    def __init__(self, sites: dict[int, FakeSite], *, run_config: dict | None = None,
                 drop: dict[str, set[int]] | None = None, tamper=None, app: ClientApp | None = None) -> None:
        self.app = app or site_app(sites)
        self.sites = sites
        self.drop = drop or {}
        self.tamper = tamper
        self.contexts = {nid: Context(run_id=7, node_id=nid, node_config={}, state=RecordDict(),
                                      run_config=dict(run_config or {"secure-aggregation": True}))
                         for nid in sites}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._count = 0

    # the Grid interface the strategies use
    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._count}"
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.drop.get(stage_of(msg), set()):
                continue
            arrived = _wire(msg)
            arrived.metadata.__dict__["_message_id"] = f"m{self._count}"
            reply = _wire(self.app(arrived, self.contexts[nid]))
            if self.tamper is not None:
                reply = self.tamper(stage_of(msg), nid, reply) or reply
            self.received.append(reply)
            replies.append(reply)
        return replies

    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused by strategies
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError
