"""The data contract a federation agrees on: features, kinds, bounds, levels, label.

Every site validates and encodes its table against the same schema file, and the
coordinator pins the schema by :meth:`Schema.sha256`. The schema holds only public
knowledge (domain bounds, category names); never statistics of any site's data.

File format (TOML, or JSON with the same structure; chosen by the file suffix)::

    name = "heart-disease"            # optional

    [label]
    name = "num"                      # column holding the label
    task = "binary"                   # "binary" | "multiclass"
    positive = [1, 2, 3, 4]           # binary: raw values meaning class 1
    negative = [0]                    # binary: raw values meaning class 0
    # classes = ["a", "b", "c"]       # multiclass instead: ordered classes

    [[features]]
    name = "age"
    kind = "numeric"                  # "numeric" | "categorical" | "boolean"
    lower = 0                         # numeric: public bounds, lower < upper
    upper = 120
    out_of_bounds = "reject"          # numeric: "reject" (default) | "clip"
    missing = "drop"                  # "drop" (default) | "impute" | "indicator"

    [[features]]
    name = "cp"
    kind = "categorical"
    levels = [1, 2, 3, 4]             # categorical: non-empty, unique
    missing = "impute"
    impute = 4                        # required for "impute"; must be a valid value

    [[features]]
    name = "fbs"
    kind = "boolean"                  # true/false, 1/0, yes/no in any case
    missing = "indicator"             # impute (default: lower bound / first level /
                                      # false) and add a 0/1 column "fbs__missing"

Values of categorical levels and of the label are compared as strings after
stripping whitespace, with numbers normalised so that ``"1"``, ``"1.0"`` and ``1``
are the same value (:func:`normalise_value`). A cell is missing when it is empty or
one of ``?``, ``NA``, ``N/A``, ``NaN``, ``null``, ``None`` (any case); such tokens
cannot be used as levels or label values. Unknown keys are errors, so a typo is never
silently ignored. Full documentation: ``docs/schema.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.errors import SchemaError

__all__ = [
    "MISSING_SUFFIX",
    "Feature",
    "Label",
    "Schema",
    "indicator_column",
    "is_missing",
    "normalise_value",
    "parse_boolean",
]

KINDS = ("numeric", "categorical", "boolean")
TASKS = ("binary", "multiclass")
MISSING_RULES = ("drop", "impute", "indicator")
OUT_OF_BOUNDS_RULES = ("reject", "clip")
MISSING_TOKENS = frozenset({"", "?", "na", "n/a", "nan", "null", "none"})
MISSING_SUFFIX = "__missing"
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})

_FEATURE_KEYS = {
    "numeric": {"name", "kind", "lower", "upper", "out_of_bounds", "missing", "impute"},
    "categorical": {"name", "kind", "levels", "missing", "impute"},
    "boolean": {"name", "kind", "missing", "impute"},
}
_REQUIRED_FEATURE_KEYS = {
    "numeric": {"name", "kind", "lower", "upper"},
    "categorical": {"name", "kind", "levels"},
    "boolean": {"name", "kind"},
}
_LABEL_KEYS = {
    "binary": {"name", "task", "positive", "negative"},
    "multiclass": {"name", "task", "classes"},
}
_TOP_KEYS = {"name", "label", "features"}


def is_missing(value: Any) -> bool:
    """True for None/NaN and for the missing-value tokens (empty, ``?``, ``NA``, ...)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    try:
        if value != value:  # NaN-like scalars (numpy, pandas.NA raises TypeError)
            return True
    except TypeError:
        return True
    return str(value).strip().lower() in MISSING_TOKENS


def normalise_value(value: Any) -> str:
    """The string a level or label value is compared as.

    Whitespace is stripped and numbers are written in one canonical form, so ``1``,
    ``"1"``, ``" 1.0 "`` and ``1.0`` all give ``"1"``, and ``2.50`` gives ``"2.5"``.
    Any other text is kept as is (case-sensitive).
    """
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def parse_boolean(value: Any) -> bool | None:
    """``true/false``, ``1/0``, ``yes/no`` (any case) as a bool; None for anything else."""
    text = normalise_value(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def indicator_column(name: str) -> str:
    """Name of the 0/1 column recording where feature ``name`` was missing."""
    return name + MISSING_SUFFIX


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _values(where: str, key: str, values: Any, *, allow_empty: bool = False) -> tuple[str, ...]:
    """Validate a list of level/label values and return them normalised."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise SchemaError(f"{where}: '{key}' must be a list of values (got {values!r})")
    if not values and not allow_empty:
        raise SchemaError(f"{where}: '{key}' must not be empty")
    out: list[str] = []
    for value in values:
        if not isinstance(value, (str, int, float)) or is_missing(value):
            raise SchemaError(
                f"{where}: '{key}' values must be strings or numbers that are not "
                f"missing-value tokens such as '', '?', 'NA' (got {value!r})"
            )
        norm = normalise_value(value)
        if norm in out:
            raise SchemaError(
                f"{where}: '{key}' values must be unique after normalising numbers and "
                f"whitespace (got {value!r}, the same as {norm!r})"
            )
        out.append(norm)
    return tuple(out)


def _check_choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = " | ".join(repr(c) for c in choices)
        raise SchemaError(f"{where}: '{key}' must be one of {options} (got {value!r})")


def _check_keys(where: str, given: dict, allowed: set[str], required: set[str]) -> None:
    for key in given:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            advice = f"; did you mean '{hint[0]}'?" if hint else ""
            raise SchemaError(
                f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))}){advice}"
            )
    for key in sorted(required - set(given)):
        raise SchemaError(f"{where}: required key '{key}' is missing")


@dataclass(frozen=True)
class Feature:
    """One input column and how it is validated and encoded.

    Attributes:
        name: column name in the data files.
        kind: ``"numeric"``, ``"categorical"`` or ``"boolean"``.
        lower, upper: numeric only; public bounds in the column's own units,
            ``lower < upper``. Encoding maps them to -1 and +1.
        out_of_bounds: numeric only; ``"reject"`` (default: out-of-bounds values are
            errors) or ``"clip"`` (clipped to the bounds, with a warning).
        levels: categorical only; the declared categories, normalised strings.
        missing: ``"drop"`` (default), ``"impute"`` or ``"indicator"``.
        impute: the value filled in for missing cells (float, level string or bool);
            required for ``"impute"``, defaults to lower / first level / False for
            ``"indicator"``, absent for ``"drop"``.
    """

    name: str
    kind: str
    lower: float | None = None
    upper: float | None = None
    out_of_bounds: str | None = None
    levels: tuple[str, ...] = ()
    missing: str = "drop"
    impute: float | str | bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SchemaError(f"feature: 'name' must be a non-empty string (got {self.name!r})")
        where = f"feature '{self.name}'"
        if self.name.endswith(MISSING_SUFFIX):
            raise SchemaError(
                f"{where}: 'name' must not end in '{MISSING_SUFFIX}', which is reserved "
                "for missing-value indicator columns"
            )
        _check_choice(where, "kind", self.kind, KINDS)
        _check_choice(where, "missing", self.missing, MISSING_RULES)
        numeric = self.kind == "numeric"
        for key in ("lower", "upper", "out_of_bounds"):
            if not numeric and getattr(self, key) is not None:
                raise SchemaError(f"{where}: '{key}' applies only to numeric features")
        if self.kind != "categorical" and self.levels:
            raise SchemaError(f"{where}: 'levels' applies only to categorical features")

        if numeric:
            if not (_is_number(self.lower) and _is_number(self.upper)
                    and math.isfinite(self.lower) and math.isfinite(self.upper)
                    and self.lower < self.upper):
                raise SchemaError(
                    f"{where}: 'lower' must be a number below 'upper' "
                    f"(got lower={self.lower!r}, upper={self.upper!r})"
                )
            object.__setattr__(self, "lower", float(self.lower))
            object.__setattr__(self, "upper", float(self.upper))
            oob = "reject" if self.out_of_bounds is None else self.out_of_bounds
            _check_choice(where, "out_of_bounds", oob, OUT_OF_BOUNDS_RULES)
            object.__setattr__(self, "out_of_bounds", oob)
        if self.kind == "categorical":
            object.__setattr__(self, "levels", _values(where, "levels", self.levels))

        if self.missing == "drop":
            if self.impute is not None:
                raise SchemaError(
                    f"{where}: 'impute' applies only when missing is 'impute' or "
                    f"'indicator' (got impute={self.impute!r} with missing='drop')"
                )
            return
        if self.impute is None:
            if self.missing == "impute":
                raise SchemaError(f"{where}: missing='impute' needs an 'impute' value")
            default = {"numeric": self.lower, "boolean": False}.get(self.kind)
            object.__setattr__(self, "impute", self.levels[0] if default is None else default)
        else:
            object.__setattr__(self, "impute", self._checked_impute(where))

    def _checked_impute(self, where: str) -> float | str | bool:
        value = self.impute
        if self.kind == "numeric":
            if _is_number(value) and self.lower <= value <= self.upper:
                return float(value)
            rule = f"a number within [lower, upper] = [{self.lower:g}, {self.upper:g}]"
        elif self.kind == "categorical":
            if isinstance(value, (str, int, float)) and normalise_value(value) in self.levels:
                return normalise_value(value)
            rule = f"one of the levels {list(self.levels)}"
        else:
            parsed = parse_boolean(value) if isinstance(value, (str, int, bool)) else None
            if parsed is not None:
                return parsed
            rule = "a boolean (true/false, 1/0, yes/no)"
        raise SchemaError(f"{where}: 'impute' must be {rule} (got {value!r})")

    def to_dict(self) -> dict[str, Any]:
        """The feature as it is written in a schema file (defaults spelled out)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "numeric":
            out.update(lower=self.lower, upper=self.upper, out_of_bounds=self.out_of_bounds)
        if self.kind == "categorical":
            out["levels"] = list(self.levels)
        out["missing"] = self.missing
        if self.impute is not None:
            out["impute"] = self.impute
        return out


@dataclass(frozen=True)
class Label:
    """The label column and the task.

    Attributes:
        name: column name in the data files.
        task: ``"binary"`` or ``"multiclass"``.
        positive, negative: binary only; the raw values meaning class 1 and class 0
            (normalised strings, disjoint, both non-empty). Other values are invalid.
        classes: multiclass only; the ordered classes (index = class id), at least 2.
    """

    name: str
    task: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SchemaError(f"label: 'name' must be a non-empty string (got {self.name!r})")
        where = f"label '{self.name}'"
        _check_choice(where, "task", self.task, TASKS)
        binary = self.task == "binary"
        for key in ("positive", "negative") if binary else ("classes",):
            object.__setattr__(self, key, _values(where, key, getattr(self, key)))
        for key in ("classes",) if binary else ("positive", "negative"):
            if getattr(self, key):
                raise SchemaError(f"{where}: '{key}' does not apply to task '{self.task}'")
        if binary:
            both = sorted(set(self.positive) & set(self.negative))
            if both:
                raise SchemaError(
                    f"{where}: 'positive' and 'negative' must not share values (got {both} in both)"
                )
        elif len(self.classes) < 2:
            raise SchemaError(
                f"{where}: 'classes' must list at least 2 classes (got {list(self.classes)})"
            )

    @property
    def allowed(self) -> tuple[str, ...]:
        """Every valid (normalised) label value."""
        return self.positive + self.negative if self.task == "binary" else self.classes

    def to_dict(self) -> dict[str, Any]:
        """The label as it is written in a schema file."""
        out: dict[str, Any] = {"name": self.name, "task": self.task}
        if self.task == "binary":
            out.update(positive=list(self.positive), negative=list(self.negative))
        else:
            out["classes"] = list(self.classes)
        return out


@dataclass(frozen=True)
class Schema:
    """A federation's data contract. Build it with :meth:`load` or :meth:`from_dict`.

    Attributes:
        features: the input columns, in encoding order.
        label: the label column and task.
        name: optional human-readable name.
    """

    features: tuple[Feature, ...]
    label: Label
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if not self.features:
            raise SchemaError("'features' must list at least one feature")
        if not isinstance(self.name, str):
            raise SchemaError(f"'name' must be a string (got {self.name!r})")
        seen: set[str] = set()
        for feature in self.features:
            if feature.name in seen:
                raise SchemaError(f"feature '{feature.name}': 'name' is listed twice")
            seen.add(feature.name)
        if self.label.name in seen:
            raise SchemaError(
                f"label '{self.label.name}': the label column must not also be a feature"
            )

    @property
    def num_outputs(self) -> int:
        """Model outputs: 1 (one logit) for binary, K for K-class multiclass."""
        return 1 if self.label.task == "binary" else len(self.label.classes)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Schema:
        """Build and validate a schema from a parsed TOML/JSON document.

        Raises:
            SchemaError: naming ``source``, the feature or label, the key, the value
                and the rule, for the first rule broken.
        """
        try:
            if not isinstance(data, dict):
                raise SchemaError(f"the schema must be a table/object (got {type(data).__name__})")
            _check_keys("schema", data, _TOP_KEYS, {"label", "features"})
            label = data["label"]
            if not isinstance(label, dict):
                raise SchemaError(f"'label' must be a table (got {label!r})")
            where = f"label '{label.get('name', '?')}'"
            _check_choice(where, "task", label.get("task"), TASKS)
            _check_keys(where, label, _LABEL_KEYS[label["task"]], _LABEL_KEYS[label["task"]])
            features = data["features"]
            if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
                raise SchemaError("'features' must be an array of tables ([[features]])")
            parsed = []
            for i, feature in enumerate(features, start=1):
                where = f"feature '{feature.get('name', f'#{i}')}'"
                _check_choice(where, "kind", feature.get("kind"), KINDS)
                kind = feature["kind"]
                _check_keys(where, feature, _FEATURE_KEYS[kind], _REQUIRED_FEATURE_KEYS[kind])
                parsed.append(Feature(**feature))
            return cls(features=tuple(parsed), label=Label(**label), name=data.get("name", ""))
        except SchemaError as err:
            raise SchemaError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schema:
        """Read a ``.toml`` or ``.json`` schema file.

        Raises:
            SchemaError: the file is missing, unreadable, not TOML/JSON, or breaks a rule.
        """
        path = Path(path)
        source = path.name
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise SchemaError(f"{path}: a schema file must end in .toml or .json")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SchemaError(f"{path}: schema file not found; check the path") from None
        except (OSError, UnicodeDecodeError) as err:
            raise SchemaError(f"{path}: cannot read the schema file ({err})") from None
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            kind = "TOML" if suffix == ".toml" else "JSON"
            raise SchemaError(f"{source}: not valid {kind}: {err}") from None
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The schema as a plain document; ``from_dict(to_dict())`` gives an equal schema."""
        out: dict[str, Any] = {"name": self.name} if self.name else {}
        out["label"] = self.label.to_dict()
        out["features"] = [f.to_dict() for f in self.features]
        return out

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical JSON of :meth:`to_dict` (sorted keys, no spaces).

        Two sites hold the same contract iff their fingerprints match; formatting,
        comments, key order and ``1`` vs ``"1.0"`` in the file do not change it.
        """
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the schema atomically: TOML, or JSON if ``path`` ends in ``.json``.

        The text goes to a temporary file in the same directory, is fsynced and then
        renamed over ``path``, so readers never see a half-written schema.
        """
        path = Path(path)
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            text = tomli_w.dumps(self.to_dict())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
