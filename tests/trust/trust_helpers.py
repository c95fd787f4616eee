"""Hand-made Flower training replies for the trust tests."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

SITES = ("hospital-1", "hospital-2", "hospital-3")  # the simulated sites of the sim_run fixture

def reply(site: str, arrays: dict[str, np.ndarray], *, num_examples: int = 10, node: int = 1,
          metrics: dict | None = None) -> Message:
    """A training reply as a ClientApp sends it (one ArrayRecord, MetricRecord, ConfigRecord)."""
    metadata = Metadata(run_id=7, message_id=f"m-{site}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, **(metrics or {})}),
        "candor": ConfigRecord({"site": site}),
    }), metadata=metadata)
