"""Test-only ClientApp: Candor's site app with a tap inside secure aggregation.

The tap, :func:`record_plaintext`, is a Flower mod placed between Candor's
``secagg_mod`` and the site's train function, so it sees each site's clear training
reply before it is masked. It writes the site's plaintext update (the model delta in
float64, its weight and the global model it started from) to
``$CANDOR_TEST_PLAINTEXT_DIR/<site>-round<r>.npz`` on the site's own disk;
test_secagg_simulation.py recomputes plaintext FedAvg from those files and compares it
with what the coordinator produced from the masked sum.

This module lives under tests/ only: the test's simulation submits a Flower App directory
whose ``clientapp`` component is this module's ``app`` (run with `candor-sim run --app-dir`). Production
code has no such hook.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from candor.client import app as site
from candor.client.secagg import secagg_mod

PLAINTEXT_DIR_ENV = "CANDOR_TEST_PLAINTEXT_DIR"


def record_plaintext(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Write the clear update of a secure training round, then pass the reply on unchanged."""
    reply = call_next(msg, context)
    if reply.has_error() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return reply
    glob, local = msg.content["arrays"], reply.content["arrays"]
    keys = list(glob.keys())
    out = Path(os.environ[PLAINTEXT_DIR_ENV])
    out.mkdir(parents=True, exist_ok=True)
    name = f"{reply.content['candor']['site']}-round{int(msg.content['config']['server-round'])}.npz"
    np.savez(out / name, num_examples=int(reply.content["metrics"]["num-examples"]), keys=np.array(keys),
             **{f"global_{i}": glob[k].numpy() for i, k in enumerate(keys)},
             **{f"delta_{i}": local[k].numpy().astype(np.float64) - glob[k].numpy().astype(np.float64)
                for i, k in enumerate(keys)})
    return reply


# The site's plain train function (Flower's decorator returns it unwrapped: the mods are
# the ClientApp's, and this app attaches its own).
_train = site.handle_train

app = ClientApp()
app.train(mods=[secagg_mod, record_plaintext])(_train)
app.evaluate()(site.app)  # evaluation and the explanation query: Candor's own app, unchanged
app.query("explain")(site.app)
