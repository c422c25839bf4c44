"""UIPE's claim on the trained tiny world: extrapolating an unlearning update forgets more (arXiv 2503.04693)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_alpha_above_zero_lowers_forget_probability(unlearned_run, tiny_cfg, method: str) -> None:
    from uipe.search.driver import make_setup
    from uipe.search.trial import evaluate_point, theta_ini_metrics

    setup = make_setup(tiny_cfg, unlearned_run, method)
    last = max(setup.epoch_dirs)
    probs = {a: evaluate_point(setup, a, last, 0.0).metric("forget_prob") for a in (0.0, 0.5, 1.0)}
    # theta = theta_un + alpha * (theta_un - theta_ini): further along the unlearning direction, the forget
    # answers must become less likely, monotonically over these steps.
    assert probs[1.0] < probs[0.5] < probs[0.0]
    # alpha = -1 is theta_ini: the start model, which knows the forget set best.
    minus_one = evaluate_point(setup, -1.0, last, 0.0)
    assert minus_one.metric("forget_prob") > probs[0.0]
    # theta_ini's own evaluation in this process, after trials extrapolated its cached model: the model is reloaded
    # (the in-place extrapolation at alpha -1 agrees with it to float rounding)
    evaluate_point(setup, 1.0, last, 0.0)
    assert theta_ini_metrics(setup)["forget_prob"] == pytest.approx(minus_one.metric("forget_prob"), rel=1e-5)


def test_unlearning_manifests_record_every_epoch(unlearned_run, tiny_cfg) -> None:
    from transformers import AutoModelForCausalLM

    for method in ("ga", "npo"):
        manifest = json.loads(unlearned_run.manifest(method).read_text())
        assert [e["epoch"] for e in manifest["epochs"]] == list(range(1, tiny_cfg.unlearn.epochs + 1))
        for e in manifest["epochs"]:
            AutoModelForCausalLM.from_pretrained(e["path"], use_safetensors=True)
