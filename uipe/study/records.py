"""What a study keeps of each seed, as typed records: an arm's chosen point at a utility floor, a method's record on
one seed, a seed's result. uipe/study/arms.py builds them, aggregate.py and driver.py read their attributes, and
study.json holds them through `to_json` / `from_json`, the only code that spells their JSON keys.

The layout is study.json's since the first study (issue 13), so existing study folders read back as they are. A
record's blocks other than its arms (theta_ini, epochs, matched utility, hypervolume, fronts, signal checks) may be
missing: the aggregate has always summarised whatever blocks a record holds, and reads a missing one as empty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uipe import metrics
from uipe.benchmarks.tofu import TOFU
from uipe.decisions import floor_key
from uipe.errors import UipeError

# The study compares TOFU's forget quality (it needs a retain model: uipe/study/driver.py refuses a study without
# one) on the whole forget split, on the author fold the search chose on and on the fold it is reported on; the
# matched-utility axis is the benchmark's reference-free forgetting measure. Every metric name the study reads or
# writes is taken here, once; `metrics.get` makes a name the catalogue lacks fail at import, not mid-study.
UTILITY = metrics.get(TOFU.utility).name  # "model_utility"
FORGET_QUALITY = metrics.get(TOFU.default_objective).name  # "forget_quality"
FORGET_QUALITY_SELECT = metrics.get(TOFU.objective_metric(FORGET_QUALITY, None, "selection_fold")).name
FORGET_QUALITY_REPORT = metrics.get(f"{FORGET_QUALITY}_report").name
FORGET_PROB = metrics.get(TOFU.forgetting).name  # "forget_prob"

CROSSFIT = f"{FORGET_QUALITY}_crossfit"  # study.json's key of ArmPoint.forget_quality_crossfit
BASE, MORE, UIPE = "base", "more", "uipe"
ARMS = (BASE, MORE, UIPE)  # the base method at its best epoch, the base method trained longer, UIPE
# arms of the forms beyond one alpha (study.forms), present when run; named by their form
FORM_ARMS = ("groups", "weighted", "anchor")

# ArmPoint field -> its key in study.json
_POINT_JSON = {"alpha": "alpha", "epoch": "epoch", "utility": UTILITY, "utility_ratio": "utility_ratio",
               "forget_quality": FORGET_QUALITY, "forget_quality_select": FORGET_QUALITY_SELECT,
               "forget_quality_report": FORGET_QUALITY_REPORT, "forget_prob": FORGET_PROB}


@dataclass(frozen=True)
class ArmPoint:
    """An arm's best point at one utility floor (uipe/study/arms.py): where it is, and what it scores. A metric
    the trial did not report is NaN."""

    alpha: float
    epoch: int
    utility: float
    utility_ratio: float  # utility / theta_ini's utility
    forget_quality: float  # on the whole forget split
    forget_quality_select: float  # on the author fold the search chose on
    forget_quality_report: float  # on the other fold, the one the study reports
    forget_prob: float
    # cross-fitted: the geometric mean of this point's report-fold forget quality and the selection-fold forget
    # quality of the point the same rule picks on the report fold, so neither fold's draw decides alone (NaN: a
    # record made before cross-fitting)
    forget_quality_crossfit: float = math.nan

    def to_json(self) -> dict[str, Any]:
        out = {key: getattr(self, name) for name, key in _POINT_JSON.items()}
        return out if math.isnan(self.forget_quality_crossfit) else out | {CROSSFIT: self.forget_quality_crossfit}

    @classmethod
    def from_json(cls, d: Any, where: str) -> ArmPoint:
        _object(d, where)
        values = {name: _number(d, key, where) for name, key in _POINT_JSON.items() if name != "epoch"}
        crossfit = _optional(d, CROSSFIT, where)
        return cls(epoch=_integer(d, "epoch", where), **values,
                   forget_quality_crossfit=math.nan if crossfit is None else crossfit)


@dataclass(frozen=True)
class SignalCheck:
    """How a reference-free signal tracked forget quality over one search's trials: Spearman's rho, and the regret
    (log10 forget quality) of choosing by the signal; None where there was too little to compute it."""

    spearman: float | None
    regret: float | None

    def to_json(self) -> dict[str, Any]:
        return {"spearman": self.spearman, "regret": self.regret}

    @classmethod
    def from_json(cls, d: Any, where: str) -> SignalCheck:
        _object(d, where)
        return cls(_nullable(d, "spearman", where), _nullable(d, "regret", where))


AtFloors = Mapping[float, "ArmPoint | None"]  # floor -> the arm's best point there (None: nothing reaches it)
Front = tuple[tuple[float, float], ...]  # (utility ratio, forget quality) per point


@dataclass(frozen=True)
class MethodRecord:
    """Everything the study keeps of one method on one seed (uipe/study/arms.py method_record)."""

    arms: Mapping[str, AtFloors]  # arm (ARMS) -> floor -> point
    theta_ini: Mapping[str, float | None] = field(default_factory=dict)  # its metrics, by catalogue name
    epochs: int | None = None  # the epochs UIPE's search could use
    longer_epochs: int | None = None  # the more-iterations baseline's
    # floor -> UIPE's utility minus the base trajectory's at UIPE's forget probability
    matched_utility: Mapping[float, float | None] = field(default_factory=dict)
    hypervolume: Mapping[str, float | None] = field(default_factory=dict)  # arm -> area (None: arm not run)
    fronts: Mapping[str, Front] = field(default_factory=dict)  # arm -> the points plotted
    signals: Mapping[str, SignalCheck] = field(default_factory=dict)  # reference-free signal -> its check
    # form arm -> floor -> its utility minus the base trajectory's at its forget probability (as matched_utility)
    matched_forms: Mapping[str, Mapping[float, float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every arm, even one not run (its floors all None): the aggregate pairs UIPE with each baseline by seed
        if missing := [arm for arm in ARMS if arm not in self.arms]:
            raise UipeError(f"a method record needs every arm ({', '.join(ARMS)}); missing {', '.join(missing)}")

    def floors(self) -> list[float]:
        """Every floor some arm recorded, highest first."""
        return sorted({f for by_floor in self.arms.values() for f in by_floor}, reverse=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "theta_ini": dict(self.theta_ini), "epochs": self.epochs, "longer_epochs": self.longer_epochs,
            "arms": {arm: {floor_key(f): None if p is None else p.to_json() for f, p in by_floor.items()}
                     for arm, by_floor in self.arms.items()},
            "matched_utility": {floor_key(f): v for f, v in self.matched_utility.items()},
            "hypervolume": dict(self.hypervolume),
            "fronts": {arm: [list(p) for p in pts] for arm, pts in self.fronts.items()},
            "signals": {name: s.to_json() for name, s in self.signals.items()},
        } | ({"matched_forms": {arm: {floor_key(f): v for f, v in by.items()}
                                for arm, by in self.matched_forms.items()}} if self.matched_forms else {})

    @classmethod
    def from_json(cls, d: Any, where: str) -> MethodRecord:
        _object(d, where)
        arms = _object(_required(d, "arms", where), f"{where}, arms")
        ini, mu, hv, fronts, signals = (_object(d.get(k) or {}, f"{where}, {k}") for k in (
            "theta_ini", "matched_utility", "hypervolume", "fronts", "signals"))
        return cls(
            arms={arm: _at_floors(_required(arms, arm, f"{where}, arms"), f"{where}, arm {arm}")
                  for arm in (*ARMS, *(a for a in FORM_ARMS if a in arms))},
            theta_ini={k: _optional(ini, k, f"{where}, theta_ini") for k in ini},
            epochs=_optional_int(d, "epochs", where), longer_epochs=_optional_int(d, "longer_epochs", where),
            matched_utility={_floor(k, f"{where}, matched_utility"): _optional(mu, k, f"{where}, matched_utility")
                             for k in mu},
            hypervolume={arm: _optional(hv, arm, f"{where}, hypervolume") for arm in hv},
            fronts={arm: _front(pts, f"{where}, front {arm}") for arm, pts in fronts.items()},
            signals={name: SignalCheck.from_json(s, f"{where}, signal {name}") for name, s in signals.items()},
            matched_forms={arm: {_floor(k, f"{where}, matched_forms"): _optional(by, k, f"{where}, matched_forms")
                                 for k in _object(by, f"{where}, matched_forms {arm}")}
                           for arm, by in _object(d.get("matched_forms") or {}, f"{where}, matched_forms").items()},
        )


@dataclass(frozen=True)
class SeedResult:
    """One seed of a study: its run folder and, per base method, its record."""

    seed: int
    methods: Mapping[str, MethodRecord]
    run_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed, "methods": {m: r.to_json() for m, r in self.methods.items()}}
        return out | ({"run_dir": self.run_dir} if self.run_dir is not None else {})

    @classmethod
    def from_json(cls, d: Any, where: str) -> SeedResult:
        _object(d, where)
        seed = _integer(d, "seed", where)
        here = f"{where} (seed {seed})"
        methods = _object(_required(d, "methods", here), f"{here}, methods")
        run_dir = d.get("run_dir")
        return cls(seed, {m: MethodRecord.from_json(r, f"{here}, method {m}") for m, r in methods.items()},
                   None if run_dir is None else str(run_dir))


def seed_results(items: Sequence[SeedResult | Mapping[str, Any]], where: str = "seed result") -> list[SeedResult]:
    """Typed seed results; a JSON object (as study.json's "seeds" holds them) is read with `from_json`, so the
    aggregate and the plots also run on a study.json read back."""
    return [s if isinstance(s, SeedResult) else SeedResult.from_json(s, f"{where} #{i}") for i, s in enumerate(items)]


def read_seeds(path: Path) -> list[SeedResult]:
    """The seed results of a study.json; a malformed one fails with one line naming the file and the entry."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot read a study result ({type(e).__name__}: {e})") from None
    seeds = _required(_object(doc, str(path)), "seeds", str(path))
    if not isinstance(seeds, list):
        raise UipeError(f"{path}: 'seeds' is not a list")
    return seed_results(seeds, f"{path}: seeds")


# ---------------------------------------------------------------- reading JSON, one line per problem

def _object(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise UipeError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def _required(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise UipeError(f"{where}: no '{key}'")
    return d[key]


def _optional(d: Mapping[str, Any], key: str, where: str) -> float | None:
    """A number or null (missing: null)."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UipeError(f"{where}: '{key}' is {v!r}, not a number")
    return float(v)


def _nullable(d: Mapping[str, Any], key: str, where: str) -> float | None:
    """A required key whose value is a number or null."""
    _required(d, key, where)
    return _optional(d, key, where)


def _number(d: Mapping[str, Any], key: str, where: str) -> float:
    """A required number; null reads as NaN (not measured), as the trial that reported it would have it."""
    v = _nullable(d, key, where)
    return math.nan if v is None else v


def _integer(d: Mapping[str, Any], key: str, where: str) -> int:
    v = _required(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UipeError(f"{where}: '{key}' is {v!r}, not an integer")
    return v


def _optional_int(d: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if d.get(key) is None else _integer(d, key, where)


def _floor(key: str, where: str) -> float:
    try:
        return float(key)
    except ValueError:
        raise UipeError(f"{where}: {key!r} is not a utility floor") from None


def _at_floors(d: Any, where: str) -> dict[float, ArmPoint | None]:
    return {_floor(k, where): None if p is None else ArmPoint.from_json(p, f"{where}, floor {k}")
            for k, p in _object(d, where).items()}


def _front(points: Any, where: str) -> Front:
    try:
        return tuple((float(x), float(y)) for x, y in (points or []))
    except (TypeError, ValueError) as e:
        raise UipeError(f"{where}: a front must be a list of [utility_ratio, forget_quality] pairs ({e})") from None
