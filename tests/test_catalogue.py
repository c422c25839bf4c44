"""The metric catalogue and the benchmark registry: names defined once, checked where a config or space names them."""

from __future__ import annotations

import math

import pytest

from uipe import metrics
from uipe.benchmarks import BENCHMARKS, check_config, get_benchmark
from uipe.config import load_config
from uipe.errors import UipeError
from uipe.results import TrialResult
from uipe.search.space import SearchSpace


def test_tofu_declares_its_metrics_once_with_their_roles() -> None:
    tofu = get_benchmark("tofu")
    assert set(BENCHMARKS) == {"tofu", "muse"} and all(m.benchmark == "tofu" for m in tofu.metrics)
    assert len({m.name for m in tofu.metrics}) == len(tofu.metrics)
    fq, mu = metrics.get("forget_quality"), metrics.get(tofu.utility)
    assert fq.objective and fq.needs_reference and fq.log_scale and not fq.needs_generation
    assert mu.utility and mu.needs_generation and not mu.objective
    # reference-free objectives: what a deployment without a retain model can search on
    assert metrics.objectives(reference=False, benchmark="tofu") == [
        "holdout_ks", "mia_loss_closeness", "mia_min_k_pp_closeness"]
    assert "verbmem_rougeL" in metrics.objectives(reference=False)  # MUSE's: in the catalogue, not TOFU's choices
    assert "forget_quality" in metrics.objectives() and "forget_quality" not in metrics.objectives(reference=False)


def test_a_name_has_one_meaning() -> None:
    same = metrics.get("holdout_ks")
    metrics.register(same)  # the identical entry again (a module reload): no-op
    with pytest.raises(UipeError, match="'holdout_ks': registered twice"):
        metrics.register(metrics.Metric("holdout_ks", "something else", "x"))
    with pytest.raises(UipeError, match="metric 'nope': not in the catalogue"):
        metrics.get("nope")


def test_derived_metrics_by_hand() -> None:
    # closeness to chance 1 - 2|AUC - 0.5|: AUC 0.8 -> 0.4, AUC 0.35 -> 0.7; a missing input derives nothing
    derived = metrics.derive_all({"mia_loss_auc": 0.8, "mia_min_k_pp_auc": 0.35})
    assert derived == pytest.approx({"mia_loss_closeness": 0.4, "mia_min_k_pp_closeness": 0.7})
    assert "mia_loss_closeness" not in metrics.derive_all({"forget_prob": 0.2})
    assert metrics.value_of("mia_loss_closeness", {"mia_loss_auc": 0.8}) == pytest.approx(0.4)
    assert metrics.value_of("mia_loss_closeness", {"mia_loss_closeness": 0.9, "mia_loss_auc": 0.8}) == 0.9
    assert math.isnan(metrics.value_of("mia_loss_closeness", {}))


def test_a_minimised_objective_is_negated_for_the_maximiser() -> None:
    low = metrics.Metric("toy_leak", "toy leak", "leak", direction="min", objective=True)
    metrics.register(low)
    try:
        r = TrialResult.scored(1.0, 2, {"toy_leak": 0.25, "model_utility": 0.5}, 0.4, 1.0, "toy_leak",
                               "model_utility")
        assert r.objective == -0.25 and r.metric("toy_leak") == 0.25 and r.feasible  # 0.4 - 0.5 <= 0
    finally:
        metrics.unregister("toy_leak")


def test_a_record_refuses_a_metric_the_catalogue_does_not_know() -> None:
    with pytest.raises(ValueError, match="metric 'made_up': reported by the evaluator but not in the metric"):
        TrialResult.scored(0.5, 1, {"made_up": 1.0, "model_utility": 0.5}, 0.4, 1.0, "made_up", "model_utility")


def test_objective_words_map_to_catalogue_names() -> None:
    tofu = get_benchmark("tofu")
    assert SearchSpace(method="ga").objective_metric(tofu) == "forget_quality"
    assert SearchSpace(method="ga", objective="pareto").objective_metric(tofu) == "forget_quality"
    assert SearchSpace(method="ga", select_on="selection_fold").objective_metric(tofu) == "forget_quality_select"
    assert SearchSpace(method="ga", objective="reference_free").objective_metric(tofu) == "holdout_ks"
    space = SearchSpace(method="ga", objective="reference_free", signal="mia_loss_closeness")
    assert space.objective_metric(tofu) == "mia_loss_closeness"
    with pytest.raises(UipeError, match="'holdout_ks' has none"):
        SearchSpace(method="ga", objective="holdout_ks", select_on="selection_fold").objective_metric(tofu)


@pytest.mark.parametrize(("override", "words"), [
    ("search.objective=forget_qualty", "search.objective: 'forget_qualty' is not an objective"),
    ("search.signal=forget_quality", "search.signal: 'forget_quality' is not a reference-free objective"),
    ("data.benchmark=wmdp", "data.benchmark: unknown benchmark 'wmdp'"),
])
def test_config_names_are_checked_against_the_catalogue_in_one_line(override: str, words: str) -> None:
    with pytest.raises(UipeError, match=words) as e:
        check_config(load_config(None, [override]))
    assert "\n" not in str(e.value)


def test_a_space_file_objective_must_be_in_the_catalogue() -> None:
    with pytest.raises(ValueError, match="'fq' is not an objective in the metric catalogue"):
        SearchSpace(method="ga", objective="fq")
    assert SearchSpace(method="ga", objective="holdout_ks").objective == "holdout_ks"


def test_the_cli_refuses_an_unknown_objective_before_any_work_with_one_line() -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "uipe.cli", "config", "show", "--set", "search.signal=fq"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "uipe: error: search.signal: 'fq' is not a reference-free objective in the metric catalogue (choose from "
        "holdout_ks, mia_loss_closeness, mia_min_k_pp_closeness)"]


def test_tofu_declares_what_prepare_and_unlearn_train_on(tmp_path) -> None:
    from uipe.data.synth import write_benchmark

    data = str(write_benchmark(tmp_path / "d", authors=20, facts=4, seed=0))
    tofu = get_benchmark("tofu")
    target, retain = (tofu.training_parts(data, "forget05", role) for role in ("target", "retain"))
    # the target trains on everything, the forget authors and their related facts included; the retain model never
    assert "forget05" in target and "related" in target and "forget05" not in retain and "related" not in retain
    assert set(retain) < set(target) and all(target[name] == retain[name] for name in retain)
    forget, kept, idk = tofu.unlearning_records(data, "forget05", needs_idk=False)
    assert tofu.unlearning_split_names("forget05") == ("forget05", "retain95") and not idk  # no IdK answers asked
    assert forget == target["forget05"] and kept == retain["retain95"]
    assert {"forget", "retain", "real_authors", "world_facts"} <= set(tofu.evaluation_records(data, "forget05"))


def test_a_search_folder_made_before_benchmarks_had_names_keeps_its_identity() -> None:
    """The identity a search wrote before this change: the space with its objective words spelled out (TOFU's
    defaults) and a setup without a benchmark field. The same search now must hash the same, or every existing run
    folder's searches would be refused as another search."""
    import hashlib
    import json
    from dataclasses import asdict

    from uipe.config import EvalConfig
    from uipe.search.driver import _identity
    from uipe.search.trial import TrialSetup

    setup = TrialSetup("ini", {1: "e1", 2: "e2"}, "tofu", "data", "forget05", "llama2", 64, EvalConfig(), "ref.json",
                       "auto", 1)
    space = SearchSpace(method="ga", objective="forget_quality")
    # the fields of that time: the forms beyond one alpha (issue 26) came later
    later = {"form", "groups", "weighted", "anchor", "trials_per_extra_dimension", "importance", "benchmark"}
    old_space = {k: v for k, v in space.model_dump().items() if k not in later} | {"signal": "holdout_ks"}
    old_setup = {k: v for k, v in asdict(setup).items() if k not in later} | {"eval": setup.eval.model_dump()}
    doc = {"space": old_space, "setup": old_setup, "epochs": [1, 2], "utility_threshold": 0.7}
    old = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _identity(space, setup, [1, 2], 0.7) == old
    assert _identity(SearchSpace(method="ga"), setup, [1, 2], 0.7) == old  # the default objective is the same one
    assert _identity(SearchSpace(method="ga", objective="holdout_ks"), setup, [1, 2], 0.7) != old
