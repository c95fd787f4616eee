"""The site's ledger after SIGKILL of the process running the ClientApp, mid-round.

In deployment the process that trains and appends to the ledger is the
``flwr-clientapp`` process the SuperNode starts for each message; it runs exactly
``client.app.handle_train``. Here a process runs that handler round after round on
a real site directory (with a lifetime budget) and is killed with SIGKILL at varied
instants, then restarted, as a restarted `candor-client` would be. After every kill
the ledger must be readable, append-only and complete, and across restarts the
budget must hold: what was spent is never reset. (A fork server pays the imports once.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

from deploy_helpers import ENV, client, pld_epsilon

from candor.common.processes import wait_until
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.partition import partition

BUDGET = 7.0
RUN_ID = 4242

TRAINER = textwrap.dedent("""
    import os, sys, time
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
    from candor.client.app import handle_train
    from candor.client.ledger import Ledger
    from candor.common.config import RunConfig
    from candor.common.encoding import Encoder
    from candor.common.models import build_model
    from candor.common.schema import Schema

    site_dir, data, schema_path, budget, run_id = sys.argv[1:6]
    schema = Schema.load(schema_path)
    run_config = {**RunConfig().to_run_config(), "model": "logreg", "target-epsilon": 0.0,
                  "noise-multiplier": 1.5, "explain": False, "schema": schema_path}
    node_config = {"site-name": "h1", "data-path": data, "schema-path": schema_path, "site-dir": site_dir,
                   "budget-epsilon": float(budget), "budget-delta": 1e-5}
    model = build_model("logreg", num_features=Encoder(schema).num_features, num_outputs=schema.num_outputs,
                        hidden=(1,))

    def serve_rounds(log):
        ledger = Ledger(site_dir + "/ledger.json", site="h1")
        while True:
            r = sum(e.mechanism.kind == "training" for e in ledger.entries()) + 1  # the server's next round
            metadata = Metadata(run_id=int(run_id), message_id=f"m{r}-{time.time()}", src_node_id=0,
                                dst_node_id=1, reply_to_message_id="", group_id=str(r), created_at=time.time(),
                                ttl=3600, message_type="train")
            content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                  "config": ConfigRecord({"server-round": r, "schema-sha256": schema.sha256()})})
            print(f"train {r}", file=log, flush=True)
            reply = handle_train(Message(content=content, metadata=metadata),
                                 Context(run_id=int(run_id), node_id=1, node_config=node_config,
                                         state=RecordDict(), run_config=run_config))
            print(f"done {r} {'refused' if reply.has_error() else 'trained'}", file=log, flush=True)

    # A fork server: the imports above are paid once; each client process is a fresh fork
    # that runs rounds until the test kills it with SIGKILL.
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            with open(line.strip(), "w") as log:
                serve_rounds(log)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


def test_ledger_survives_sigkill_mid_round_and_restarts_never_reset_the_budget(tmp_path):
    site = tmp_path / "site"
    assert client("init", site, "--site-name", "h1")[0] == 0
    data = tmp_path / "h1.csv"
    partition(breast_cancer_frame(), num_sites=3, label="diagnosis", seed=5)[0].to_csv(data, index=False)
    rng = random.Random(1)
    seen_rounds = 0
    server = subprocess.Popen([sys.executable, "-c", TRAINER, str(site), str(data), str(DEMO_SCHEMA_PATH),
                               str(BUDGET), str(RUN_ID)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=ENV, start_new_session=True)
    try:
        for attempt in range(4):
            out = tmp_path / f"client-{attempt}.log"
            server.stdin.write(f"{out}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())

            def lines() -> list[str]:
                return out.read_text().splitlines() if out.exists() else []

            # Let one round complete (its length measured), then kill at a random instant
            # of the next one: in training, in the accountant, or in the ledger write.
            wait_until(lambda: any(l.startswith("train") for l in lines()), timeout=120, what="a round to start")
            began = time.monotonic()
            wait_until(lambda: any(l.startswith("done") for l in lines()), timeout=120, what="a round to end")
            round_seconds = time.monotonic() - began
            wait_until(lambda: sum(l.startswith("train") for l in lines()) >= 2, timeout=60, what="the next round")
            threading.Event().wait(rng.uniform(0.0, round_seconds))  # the random instant of the kill
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            text = out.read_text()
            doc = json.loads((site / "ledger.json").read_text())
            releases = [(e["kind"], e["round"]) for e in doc["entries"]]
            assert len(set(releases)) == len(releases), releases  # nothing recorded twice
            rounds = [r for kind, r in releases if kind == "training"]
            assert rounds == list(range(1, len(rounds) + 1)), rounds  # nothing torn, lost, duplicated, reordered
            assert len(rounds) >= seen_rounds  # a restart never forgets what was spent
            acknowledged = [int(l.split()[1]) for l in text.splitlines() if l.startswith("done") and "trained" in l]
            assert all(r <= len(rounds) for r in acknowledged)  # every reply that left was recorded first
            seen_rounds = len(rounds)
            code, ledger_out, err = client("ledger", site, "--json")
            assert code == 0, err
    finally:
        server.kill()
        server.wait()
    entries = json.loads((site / "ledger.json").read_text())["entries"]
    assert pld_epsilon(entries, 1e-5) <= BUDGET * 1.02  # never overspent, whatever the kills
    assert all(e["run_id"] == str(RUN_ID) for e in entries)
