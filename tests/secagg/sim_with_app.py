"""Test-only launcher: ``candor-sim`` submitting another Flower App directory.

    python sim_with_app.py APP_DIR run --num-sites 3 --out DIR -c KEY=VALUE ...

runs ``candor-sim`` with its arguments, except that ``flwr run`` submits ``APP_DIR`` (a
directory with its own pyproject.toml, e.g. one whose ``clientapp`` is plaintext_tap.py)
instead of Candor's own app directory. Until the simulation engine takes an app
directory itself, this sets the engine's ``APP_DIR`` in this process only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from candor.simulations import cli, engine

if __name__ == "__main__":
    engine.APP_DIR = Path(sys.argv[1]).resolve()
    sys.exit(cli.main(sys.argv[2:]))
