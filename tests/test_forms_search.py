"""Searches of the forms beyond one alpha (issue 26) on the trained tiny world: the same cheap trials, each point's
coefficient vector in results.csv, MLflow and the registry, and a chosen model that is exactly its extrapolation."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_run, run_uipe
from test_extrapolate import load_folder
from uipe.report import from_csv
from uipe.search.driver import run_search

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# two groups that cover a Llama: the decoder blocks, and everything else
GROUPS = {"blocks": {"patterns": ["model.layers.*"]},
          "outer": {"patterns": ["model.embed_tokens*", "model.norm*", "lm_head*"]}}


def _space(tmp: Path, form: str, **extra: object) -> Path:
    doc = {"method": "ga", "alpha": {"low": 0.0, "high": 1.5}, "form": form, "num_samples": 5, "startup_trials": 2,
           "trials_per_extra_dimension": 0, "objective": "forget_quality", **extra}
    path = tmp / f"{form}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cfg(tiny_cfg):
    return tiny_cfg.model_copy(update={"search": tiny_cfg.search.model_copy(update={"num_samples": None})})


def test_a_groups_search_records_each_group_alpha_and_writes_exactly_its_point(unlearned_run, tiny_cfg, tmp_path):
    from uipe.tracking import client, tracking_uri

    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    out = run_search(_cfg(tiny_cfg), paths, "ga", _space(tmp_path, "groups", groups=GROUPS, epochs=[2, 3]))
    folder = paths.search("ga-groups")
    rows = [r for r in from_csv((folder / "results.csv").read_text()) if r.ok]
    assert len(rows) == out.trials == 5 and not paths.search("ga").exists()  # its own folder, the global one untouched
    ini = load_folder(Path(yaml.safe_load((folder / "chosen.yaml").read_text())["theta_ini"]))
    size = {g: sum(v.numel() for k, v in ini.items() if (k.startswith("model.layers.")) == (g == "blocks"))
            for g in GROUPS}
    for r in rows:  # alpha is the parameter-weighted mean of the group alphas
        a = {g: r.coefficients[f"alpha_{g}"] for g in GROUPS}
        assert r.alpha == pytest.approx(sum(a[g] * size[g] for g in GROUPS) / sum(size.values()), rel=1e-12)
    assert {r.epoch for r in rows if r.is_base} == {2, 3}  # the base method at every epoch, as in a global search
    assert any(r.coefficients["alpha_blocks"] != r.coefficients["alpha_outer"] for r in rows)
    chosen = yaml.safe_load((folder / "chosen.yaml").read_text())
    assert chosen["form"] == "groups" and {"alpha_blocks", "alpha_outer"} <= set(chosen)
    # the chosen model is theta_un + alpha_g * (theta_un - theta_ini), group by group, computed here by hand in fp64
    got, un = load_folder(Path(chosen["model"])), load_folder(Path(chosen["theta_un"]))
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        a = chosen["alpha_blocks"] if key.startswith("model.layers.") else chosen["alpha_outer"]
        want = un[key].double() + a * (un[key].double() - ini[key].double())
        torch.testing.assert_close(got[key].double(), want, rtol=1e-6, atol=1e-6)
    version = client(tracking_uri(tiny_cfg, paths)).get_model_version(out.registered["name"], out.registered["version"])
    assert version.tags["form"] == "groups" and float(version.tags["alpha_outer"]) == chosen["alpha_outer"]
    child = client(tracking_uri(tiny_cfg, paths)).search_runs(
        [client(tracking_uri(tiny_cfg, paths)).get_run(out.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{out.parent_run_id}'")[0]
    assert {"alpha_blocks", "alpha_outer", "alpha", "epoch"} <= set(child.data.params)


def test_a_weighted_search_estimates_importance_once_per_epoch_and_scales_each_element(unlearned_run, tiny_cfg,
                                                                                       tmp_path) -> None:
    from safetensors.torch import load_file

    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    space = _space(tmp_path, "weighted", epochs=[2, 3], weighted={"items": 8, "alpha_scale": 2.0})
    out = run_search(_cfg(tiny_cfg), paths, "ga", space)
    rows = [r for r in from_csv((paths.search("ga-weighted") / "results.csv").read_text()) if r.ok]
    assert len(rows) == out.trials and all("retain_lambda" in r.coefficients for r in rows)
    chosen = yaml.safe_load((paths.search("ga-weighted") / "chosen.yaml").read_text())
    imp = Path(chosen["importance"])
    assert imp.parent.name == "importance" and imp.name == Path(chosen["theta_un"]).name  # beside the epochs
    f = load_file(imp / "model.safetensors")
    ini, un, got = (load_folder(Path(chosen[k])) for k in ("theta_ini", "theta_un", "model"))
    key, lam, alpha = "model.layers.1.self_attn.v_proj.weight", chosen["retain_lambda"], chosen["alpha"]
    ff, fr = f[f"f_forget.{key}"].double(), f[f"f_retain.{key}"].double()
    s = torch.nan_to_num(ff / (ff + lam * fr), nan=0.0)
    assert 0 <= float(s.min()) and float(s.max()) <= 1
    want = un[key].double() + alpha * s * (un[key].double() - ini[key].double())
    torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)
    mtime = (imp / "model.safetensors").stat().st_mtime_ns  # the same search again, anew: the estimate is reused
    shutil.rmtree(paths.search("ga-weighted"))
    run_search(_cfg(tiny_cfg), paths, "ga", space)
    assert (imp / "model.safetensors").stat().st_mtime_ns == mtime
    assert math.isfinite(out.chosen["objective"])


def test_a_group_pattern_that_misses_a_parameter_is_one_line_and_exit_2(unlearned_run, ray_session, tmp_path) -> None:
    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    bad = _space(tmp_path, "groups", groups={"blocks": {"patterns": ["model.layers.*"]}})
    code = run_uipe(["search", "--run-dir", str(paths.root), "--method", "ga", "--space", str(bad)], ray_session,
                    tmp_path / "out.txt")
    last = (tmp_path / "out.txt").read_text().strip().splitlines()[-1]
    # the first parameter (sorted) the groups miss: lm_head, embeddings and the final norm are in none
    assert code == 2 and re.search(r"tensor '(lm_head|model\.embed_tokens|model\.norm)[^']*' is in no group", last), last
    assert not paths.search("ga-groups").exists()
