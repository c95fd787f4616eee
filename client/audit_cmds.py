"""``candor-client audit SITE RUN_LOG``: what ran on this site's data, and what it cost.

Cross-checks the coordinator's published audit log (signed; :mod:`common.auditlog`)
against the site's own receipts (:mod:`client.receipts`) and privacy ledger:

- the log verifies: every line, link and Ed25519 signature, with the coordinator's
  public key (``audit_public_key.pem`` beside the log, or ``--public-key``);
- every update the site sent in that run is in the log with the same hash (aggregated,
  or rejected with the reason), and the log lists no update from the site that the site
  has no receipt for;
- every model the site received is the one the log says was sent in that round
  (training) or came out of it (evaluation);
- the privacy mechanisms the log records for the site (σ, q, steps per round, and any
  other release such as the explanation) are the ones in the site's ledger;
- the app the log's start entry names (``app_sha256``, :mod:`common.app_hash`) is one this
  site would run: its installed Candor release, an app it approved
  (``SITE_DIR/approved_apps.json``, revoked ones included), or one its receipts show it
  ran; and every receipt of the run names that same app (what the site's guard verified);

then prints what the run cost the site, recomputed from its own ledger. Exit 0 when
everything agrees, 1 when anything does not (each discrepancy is printed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from candor.common.auditlog import load_public_key, read_log
from candor.common.errors import SiteError
from candor.common.policy import lifetime_spent
from candor.common.privacy import Accountant

from .approval import APPROVED_APPS, Approvals
from .budget import SiteBudget
from .ledger import Ledger
from .receipts import ledger_path_for, read_receipts

__all__ = ["audit"]


def _site_files(path: Path) -> tuple[Path, Path]:
    """(receipts, ledger) for a site directory or a receipts file."""
    if path.is_dir():
        if (path / "receipts.jsonl").is_file():
            path = path / "receipts.jsonl"
        else:
            found = sorted(path.glob("*.receipts.jsonl"))
            if len(found) != 1:
                raise SiteError(f"{path}: expected a site directory holding receipts.jsonl, or one "
                                  f"*.receipts.jsonl file; found {len(found)}. Give the receipts file itself.")
            path = found[0]
    if not path.is_file():
        raise SiteError(f"{path}: no receipts here; give the site directory (with receipts.jsonl and "
                          "ledger.json) or the receipts file")
    return path, ledger_path_for(path)


def _log_files(path: Path, public_key: str | None) -> tuple[Path, Path]:
    log = path / "audit.jsonl" if path.is_dir() else path
    return log, Path(public_key) if public_key else log.with_name("audit_public_key.pem")


def _mechanisms(history: list[dict[str, Any]]) -> list[tuple[int, float, float, int]]:
    return sorted((int(h["round"]), float(h["noise_multiplier"]), float(h["sample_rate"]), int(h["steps"]))
                  for h in history)


def _same(a: list[tuple[int, float, float, int]], b: list[tuple[int, float, float, int]]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[3] == y[3] and math.isclose(x[1], y[1], rel_tol=1e-9)
                                    and math.isclose(x[2], y[2], rel_tol=1e-9) for x, y in zip(a, b))


def _app_check(start: dict[str, Any], receipts_file: Path, receipts: list[dict[str, Any]], mine: list[dict[str, Any]],
               rounds: set[int]) -> tuple[str, list[str]]:
    """(the line about the run's app, the problems): is the app the log names one this site runs?"""
    from candor.common.app_hash import AppBundleError, installed_release

    logged = start.get("app_sha256")
    if not logged:
        return ("App: the log names no app_sha256 (written before Candor checked app code); not checked.", [])
    try:
        installed = installed_release().sha256
    except AppBundleError as err:
        raise SiteError(str(err)) from None
    site_dir = receipts_file.parent
    approvals = Approvals(site_dir) if (site_dir / APPROVED_APPS).is_file() else None
    approved = approvals.ever() if approvals else set()
    ran = {str(r["app_sha256"]) for r in receipts if r.get("app_sha256")}
    problems = [f"round {r['round']} ({r['kind']}): your receipt says app sha256 {str(r['app_sha256'])[:16]} handled it; "
                f"the log says the run's app was {logged[:16]}" for r in mine
                if r.get("app_sha256") and r["app_sha256"] != logged]
    if logged == installed:
        return f"App: sha256 {logged[:16]}, this site's installed Candor release.", problems
    if logged in approved or logged in ran:
        return f"App: sha256 {logged[:16]}, an app this site approved (not its installed release).", problems
    problems += [f"round {r}: the log says app sha256 {logged[:16]} ran, which this site never approved (its installed "
                 f"release is {installed[:16]}; `candor-client approved {site_dir}` lists what it approved)"
                 for r in sorted(rounds)]
    return f"App: sha256 {logged[:16]}, NOT one this site approved.", problems


def audit(site_path: str | Path, log_path: str | Path, *, public_key: str | None = None) -> int:
    receipts_file, ledger_file = _site_files(Path(site_path))
    log_file, key_file = _log_files(Path(log_path), public_key)
    entries = read_log(log_file, load_public_key(key_file))
    start = entries[0]["body"]
    run_id = str(start.get("run_id"))
    receipts = read_receipts(receipts_file)
    if not receipts:
        raise SiteError(f"{receipts_file}: holds no receipts")
    site = str(receipts[0]["site"])
    mine = [r for r in receipts if str(r["run_id"]) == run_id]
    rounds = {e["body"]["round"]: e["body"] for e in entries if e["kind"] == "round"}
    final = entries[-1]["body"] if entries[-1]["kind"] == "final" else None
    global_after = {0: start["initial_model_sha256"], **{r: b["global_model_sha256"] for r, b in rounds.items()}}
    problems: list[str] = []
    lines: list[str] = []

    print(f"Audit log {log_file}: {len(entries)} entries verified (Ed25519 key {start['audit_key']['sha256'][:16]}"
          f"{', ephemeral' if start['audit_key'].get('ephemeral') else ''}); run {run_id}"
          f"{'' if final else ' — INCOMPLETE: no final entry'}.")
    print(f"Site '{site}': {len(mine)} receipt(s) for this run in {receipts_file}.")
    sent = {r["sent_update_sha256"] for r in mine if r["kind"] == "train"}
    for rc in sorted(mine, key=lambda r: (r["round"], r["kind"] != "train")):
        r, body = rc["round"], rounds.get(rc["round"])
        if rc["kind"] == "evaluate":
            ok = global_after.get(r) == rc["received_model_sha256"]
            (lines if ok else problems).append(
                f"round {r}: the model you evaluated ({rc['received_model_sha256'][:16]}) "
                + ("is the round's global model in the log" if ok else
                   f"is not the global model the log records ({str(global_after.get(r))[:16]})"))
            continue
        if body is None:
            problems.append(f"round {r}: you trained and sent an update, but the log has no round {r}")
            continue
        if rc["received_model_sha256"] != body["sent_model_sha256"]:
            problems.append(f"round {r}: the model you received ({rc['received_model_sha256'][:16]}) is not the one "
                            f"the log says was sent ({body['sent_model_sha256'][:16]})")
        listed = [u for u in body["updates"] if u["site"] == site]
        rejected = [x["reason"] for x in body["rejected"] if x["site"] == site]
        if body.get("secure_aggregation"):
            (lines if listed else problems).append(
                f"round {r}: your update went into the secure sum" if listed else
                f"round {r}: you sent an update but the log does not list '{site}' in the round")
        elif any(u["sha256"] == rc["sent_update_sha256"] for u in listed):
            lines.append(f"round {r}: your update {rc['sent_update_sha256'][:16]} is in the log, "
                         + (f"REJECTED: {rejected[0]}" if rejected else "aggregated"))
        else:
            problems.append(f"round {r}: the update you sent ({rc['sent_update_sha256'][:16]}) is not in the log"
                            + (f"; it lists {', '.join(str(u['sha256'])[:16] for u in listed)} under your name"
                               if listed else ""))
    for r, body in sorted(rounds.items()):
        for u in body["updates"]:
            if u["site"] == site and not body.get("secure_aggregation") and u["sha256"] not in sent:
                problems.append(f"round {r}: the log lists an update from '{site}' ({str(u['sha256'])[:16]}) "
                                "that you have no receipt for")

    ledger = Ledger(ledger_file, site=site).entries()
    run_entries = [e for e in ledger if e.mechanism.run_id == run_id]
    ours = _mechanisms([e.mechanism.to_dict() for e in run_entries])
    if final is not None and site in final["privacy"]:
        logged = _mechanisms(final["privacy"][site].get("history", []))
    else:  # no final entry: the training rounds the log has
        logged = _mechanisms([{"round": r, **b_u["privacy"]} for r, b in rounds.items() for b_u in b["updates"]
                              if b_u["site"] == site and b_u.get("privacy")])
    if not _same(ours, logged):
        problems.append(f"privacy: your ledger has {len(ours)} release(s) for this run {ours}; the log records "
                        f"{len(logged)} {logged}")
    took_part = {int(r["round"]) for r in mine} | {r for r, b in rounds.items()
                                                   if any(u["site"] == site for u in b["updates"])}
    app_line, app_problems = _app_check(start, receipts_file, receipts, mine, took_part)
    print(app_line)
    problems += app_problems
    for line in lines:
        print(f"  {line}")
    if run_entries:
        last = run_entries[-1]
        eps_run = Accountant(last.accountant, delta=last.delta, history=[e.mechanism for e in run_entries]).epsilon()
        budget_file = Path(ledger_file).with_name("budget.toml")  # a deployed site's own budget, if it set one
        life = lifetime_spent([e.mechanism for e in ledger], [e.delta for e in ledger], SiteBudget.read(budget_file))
        print(f"Cost: this run spent ε = {eps_run:.3f} of your data (δ = {last.delta:g}, {last.accountant.upper()}, "
              f"{len(run_entries)} release(s) in your ledger {ledger_file}); lifetime ε = {life.epsilon:.3f} "
              f"at δ = {life.delta:g} ({life.accountant.upper()}) over {len(ledger)} release(s) in all runs.")
    else:
        print(f"Cost: your ledger {ledger_file} records no private release in this run "
              + ("(the run was not differentially private: dp=false)." if not start["run_config"].get("dp", True)
                 else "."))
    if problems:
        print(f"PROBLEMS ({len(problems)}):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: the log agrees with your receipts and your ledger.")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="check a coordinator's published audit log against this site's "
                                            "receipts and ledger")
    p.add_argument("site", help="the site directory (receipts.jsonl, ledger.json) or a receipts file")
    p.add_argument("run_log", help="the run's audit.jsonl, or the run directory / published bundle holding it")
    p.add_argument("--public-key", help="the coordinator's audit public key (default: audit_public_key.pem beside "
                                        "the log)")
    p.set_defaults(func=lambda args: audit(args.site, args.run_log, public_key=args.public_key))
