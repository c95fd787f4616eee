"""``candor-client predict`` and ``candor-client explain``: score and explain records at
the site. Both run offline; nothing is sent anywhere.

    candor-client predict MODEL --data RECORDS.csv --out PRED.csv [--id-column COL]
    candor-client explain MODEL --data RECORDS.csv --out EXPL.csv [--id-column COL]
                          [--top K] [--record ID --plot OUT.png]

MODEL is a run directory, a bundle directory containing ``model.pt``, or a ``model.pt``
file. The records are validated against the model's own schema by the core validator
(the label column is not needed). Contributions are Integrated Gradients of the
predicted probability against the schema's reference record (see common/explain.py
and docs/explainability.md).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from candor.common.atomic import write_atomic, write_figure_atomic
from candor.common.errors import ConfigError
from candor.common.explain import Explanation, LoadedModel, Records, attribute, load_model, load_records, predict
from candor.common.schema import indicator_column

__all__ = ["explain_records", "predict_records"]


def _prepare(model_path: str, data: str, out: str, id_column: str | None) -> tuple[LoadedModel, Records, torch.Tensor]:
    if Path(out).resolve() == Path(data).resolve():
        raise ConfigError(f"--out {out} is the input file; write the results to another file")
    loaded = load_model(model_path)
    records = load_records(data, loaded.schema, id_column=id_column)
    for problem in records.warnings:
        print(problem, file=sys.stderr)
    x = torch.from_numpy(loaded.encoder.transform(records.frame))
    return loaded, records, x


def _write_csv(frame: pd.DataFrame, path: str) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6g")
    write_atomic(path, buffer.getvalue())


def _joined(values: tuple[str, ...]) -> str:
    return "|".join(values)


def predict_records(model_path: str, data: str, out: str, *, id_column: str | None = None) -> int:
    """Write ``record, probability, predicted`` per record (multiclass: plus one
    ``probability[class]`` column per class; ``probability`` is the predicted class's)."""
    loaded, records, x = _prepare(model_path, data, out, id_column)
    label = loaded.schema.label
    probs = predict(loaded.model, x, num_outputs=loaded.schema.num_outputs)
    if label.task == "binary":
        table = pd.DataFrame({"record": records.ids, "probability": probs,
                              "predicted": np.where(probs >= 0.5, _joined(label.positive), _joined(label.negative))})
    else:
        best = probs.argmax(axis=1)
        table = pd.DataFrame({"record": records.ids, "probability": probs[np.arange(len(best)), best],
                              "predicted": np.asarray(label.classes)[best]})
        for k, name in enumerate(label.classes):
            table[f"probability[{name}]"] = probs[:, k]
    _write_csv(table, out)
    print(f"Wrote {len(table)} predictions to {out} (model {loaded.path}).")
    return 0


def _value_text(loaded: LoadedModel, row: pd.Series, name: str) -> str:
    feature = next(f for f in loaded.schema.features if f.name == name)
    if feature.missing == "indicator" and row[indicator_column(name)] == 1:
        return f"missing (imputed {feature.impute})"
    value = row[name]
    if feature.kind == "numeric":
        return f"{value:g}"
    if feature.kind == "boolean":
        return "true" if value == 1 else "false"
    return str(value)


def _reference_text(loaded: LoadedModel, name: str) -> str:
    feature = next(f for f in loaded.schema.features if f.name == name)
    if feature.kind == "numeric":
        return f"{loaded.encoder.decode_value(name, 0.0):g}"
    return "false" if feature.kind == "boolean" else "(no level)"


def _outcomes(loaded: LoadedModel, expl: Explanation) -> np.ndarray:
    label = loaded.schema.label
    if label.task == "binary":
        return np.full(len(expl.output), _joined(label.positive), dtype=object)
    return np.asarray(label.classes, dtype=object)[expl.target]


def explain_records(model_path: str, data: str, out: str, *, id_column: str | None = None, top: int = 5,
                    record: str | None = None, plot: str | None = None) -> int:
    """Write the ``top`` contributions of each record, largest |contribution| first:
    ``record, outcome, probability, reference_probability, rank, feature, value,
    reference, contribution, reason``; optionally a waterfall plot of one record."""
    if (record is None) != (plot is None):
        raise ConfigError("--record and --plot go together: name the record to plot and the PNG to write")
    if top < 1:
        raise ConfigError(f"--top must be an integer >= 1 (got {top})")
    loaded, records, x = _prepare(model_path, data, out, id_column)
    row_of = None
    if record is not None:
        matches = [i for i, r in enumerate(records.ids) if r == record]
        if len(matches) != 1:
            where = f"in column '{id_column}'" if id_column else "as a row number (1 = first data row)"
            raise ConfigError(f"--record {record!r} matches {len(matches)} records {where} of {data}; "
                              "name exactly one")
        row_of = matches[0]
    expl = attribute(loaded.model, loaded.encoder, x)
    outcomes = _outcomes(loaded, expl)
    rows = []
    for i, rid in enumerate(records.ids):
        order = np.argsort(-np.abs(expl.contributions[i]), kind="stable")[:top]
        for rank, j in enumerate(order, start=1):
            name, c = expl.features[j], float(expl.contributions[i, j])
            value = _value_text(loaded, records.frame.iloc[i], name)
            rows.append({
                "record": rid, "outcome": outcomes[i], "probability": expl.output[i],
                "reference_probability": expl.baseline[i], "rank": rank, "feature": name, "value": value,
                "reference": _reference_text(loaded, name), "contribution": c,
                "reason": f"{name} = {value} pushed P({outcomes[i]}) {'up' if c >= 0 else 'down'} by {abs(c):.3f}",
            })
    _write_csv(pd.DataFrame(rows), out)
    print(f"Wrote the top {min(top, len(expl.features))} contributions of {len(records.ids)} records to {out} "
          f"(contributions sum to P - P(reference) within {expl.gap:.1e}).")
    if row_of is not None:
        waterfall(loaded, records, expl, row_of, outcomes[row_of], plot)
        for r in rows:
            if r["record"] == record:
                print(f"  {r['reason']}")
        print(f"Wrote the waterfall plot of record {record} to {plot}.")
    return 0


def waterfall(loaded: LoadedModel, records: Records, expl: Explanation, i: int, outcome: str, path: str,
              *, top: int = 10) -> None:
    """From P(reference) to P(record): one bar per feature, the rest grouped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contrib = expl.contributions[i]
    order = list(np.argsort(-np.abs(contrib), kind="stable"))
    shown = order[:top]
    labels = [f"{expl.features[j]} = {_value_text(loaded, records.frame.iloc[i], expl.features[j])}" for j in shown]
    steps = [float(contrib[j]) for j in shown]
    if len(order) > top:
        labels.append(f"{len(order) - top} other features")
        steps.append(float(contrib[order[top:]].sum()))
    start = float(expl.baseline[i])
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.4 * len(steps)))
    level = start
    for k, step in enumerate(steps):
        ax.barh(k, step, left=level, color="#c0392b" if step >= 0 else "#2471a3")
        ax.text(level + step, k, f" {step:+.3f}", va="center", ha="left" if step >= 0 else "right", fontsize=8)
        level += step
    path_levels = np.cumsum([start] + steps)
    pad = 0.15 * max(float(np.ptp(path_levels)), 1e-3)
    ax.set_xlim(path_levels.min() - pad, path_levels.max() + pad)
    ax.axvline(start, color="grey", ls=":", lw=1)
    ax.axvline(float(expl.output[i]), color="k", lw=1)
    ax.set_yticks(range(len(steps)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"P({outcome})")
    ax.set_title(f"Record {records.ids[i]}: P({outcome}) = {expl.output[i]:.3f}, "
                 f"reference record {start:.3f} (dotted)", fontsize=10)
    fig.tight_layout()
    write_figure_atomic(fig, path)


def _common(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_BUNDLE",
                   help="run directory, bundle directory containing model.pt, or a model.pt file")
    p.add_argument("--data", required=True, help="CSV or Parquet file of records (the label column is not needed)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--id-column", help="column identifying each record (default: the row number, 1 = first)")


def register(subparsers) -> None:
    """``predict`` and ``explain``: offline, at the site."""
    p = subparsers.add_parser("predict", help="score records with a Candor model (offline)")
    _common(p)
    p.set_defaults(func=lambda a: predict_records(a.model, a.data, a.out, id_column=a.id_column))
    p = subparsers.add_parser("explain", help="explain the model's score of each record (offline)")
    _common(p)
    p.add_argument("--top", type=int, default=5, help="contributions listed per record (default 5)")
    p.add_argument("--record", help="a record ID to draw as a waterfall plot (with --plot)")
    p.add_argument("--plot", help="PNG file for the waterfall plot of --record")
    p.set_defaults(func=lambda a: explain_records(a.model, a.data, a.out, id_column=a.id_column, top=a.top,
                                                  record=a.record, plot=a.plot))
