"""Loss and gradient parity of uipe's 10 unlearning objectives with open-unlearning's trainers (run by hand).

Same tiny Llama, same batches, same hyper-parameters: uipe's `compute` and open-unlearning's `compute_loss` each give
a loss and, by autograd, a gradient over every parameter; the script prints |loss_u - loss_o| / |loss_o| and
||grad_u - grad_o|| / ||grad_o|| (all parameters as one vector) and whether both are within --rtol (1e-5). It also
compares uipe's default hyper-parameters with those open-unlearning's configs/trainer/<Method>.yaml runs. No
open-unlearning code is copied: its modules are imported from a checkout.

Two batches per method: "qa", TOFU's shape (prompt and padding labelled -100, answers of different lengths), and
"full", every label an answer token and no padding. theta_ini is a tiny Llama fitted to the batches (answer tokens
likely, as a target model knows its forget set); theta is a perturbed copy of it. Documented differences (the exit
status is 0 when only they differ):
- KL: uipe averages over answer tokens, open-unlearning over every position, the last included (uipe/methods/kl.py);
- UNDIAL, "qa": at positions labelled -100 open-unlearning lowers the logit of vocabulary entry V-100 (its scatter
  with index -100), uipe none (uipe/methods/undial.py);
- SimNPO, "full": open-unlearning's |y| counts every label not -100, the first one too, which no position predicts
  (in TOFU's batches the first label, a prompt token, is always -100). uipe writes its delta as gamma/beta and has
  no forget weight (its SimNPO.yaml runs gamma 0.125): compared at delta 0 and weight 1.

Set-up (a separate environment: open-unlearning is not a package uipe depends on):

    python3 -m venv /tmp/ou-venv
    /tmp/ou-venv/bin/pip install "torch==2.13.0" "transformers==5.24.0" accelerate "pydantic==2.14.4"
    mkdir /tmp/open-unlearning && git --git-dir=<its git dir> archive HEAD | tar -x -C /tmp/open-unlearning
    /tmp/ou-venv/bin/python scripts/parity_losses.py --open-unlearning /tmp/open-unlearning [--json out.json]

open-unlearning's package __init__ files (hydra, omegaconf, the registry) are skipped: `trainer` and
`trainer.unlearn` are registered as bare packages over src/trainer, and `deepspeed` (imported by its RMU only for an
isinstance check) as an empty module when it is not installed. Its trainers are created without Trainer.__init__
(no TrainingArguments, no accelerator) and given the attributes their compute_loss reads.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

FIT_STEPS = 25  # theta_ini's fit to the batches: enough for answer-token p of ~.3-.9, not 1
# Differences by design (see the module docstring): (method, batch) -> why.
DOCUMENTED = {
    ("kl", "qa"): "uipe: answer tokens only; open-unlearning: every position",
    ("kl", "full"): "open-unlearning also scores the last position and divides by B*T",
    ("undial", "qa"): "open-unlearning lowers token V-100 at positions labelled -100",
    ("simnpo", "full"): "open-unlearning's |y| counts labels[:, 0], which no position predicts",
}


def import_open_unlearning(root: Path) -> dict[str, Any]:
    """open-unlearning's trainer classes from a checkout, without its package __init__ files."""
    src = root / "src" / "trainer"
    if not (src / "unlearn" / "grad_diff.py").is_file():
        sys.exit(f"--open-unlearning {root}: no src/trainer/unlearn/grad_diff.py there (not a checkout?)")
    for name, path in (("trainer", src), ("trainer.unlearn", src / "unlearn")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = package
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        stub = types.ModuleType("deepspeed")
        stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        stub.DeepSpeedEngine = type("DeepSpeedEngine", (), {})  # RMU's isinstance check only
        sys.modules["deepspeed"] = stub

    classes = {"ga": ("grad_ascent", "GradAscent"), "graddiff": ("grad_diff", "GradDiff"),
               "kl": ("grad_diff", "GradDiff"),
               "npo": ("npo", "NPO"), "simnpo": ("simnpo", "SimNPO"), "idkdpo": ("dpo", "DPO"), "rmu": ("rmu", "RMU"),
               "undial": ("undial", "UNDIAL"), "wga": ("wga", "WGA"), "satimp": ("satimp", "SatImp")}
    return {m: getattr(importlib.import_module(f"trainer.unlearn.{mod}"), cls) for m, (mod, cls) in classes.items()}


def tiny_models(batches: list[dict[str, torch.Tensor]], layers: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(theta, theta_ini): theta_ini a tiny Llama fitted to the batches (answer tokens at p ~ .5-1, as a target model
    knows its forget set, so that WGA's and SatImp's weights are not all ~0), theta a perturbed copy, so that
    reference ratios are not all 0. Vocabulary 128 >= 100, so open-unlearning's UNDIAL index -100 stays inside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      attn_implementation="eager", use_cache=False)
    ref = LlamaForCausalLM(cfg).float()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(FIT_STEPS):
        opt.zero_grad()
        sum(ref(**b).loss for b in batches).backward()
        opt.step()
    ref.eval().requires_grad_(False)
    model = copy.deepcopy(ref).train().requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.005 * torch.randn_like(p))
    return model, ref


def make_batch(seed: int, kind: str, bsz: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (bsz, length), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    if kind == "qa":
        labels[:, :4] = -100  # the prompt
        labels[1, 4:6] = -100  # a longer prompt: answers of different lengths
        labels[0, -3:], mask[0, -3:] = -100, 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cases() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(method, uipe params, open-unlearning attributes): the same hyper-parameters, named as each side names them.
    The new methods run at their defaults (RMU at layer 1 of the 3-layer model instead of 7)."""
    return [
        ("ga", {}, {}),
        ("graddiff", {"retain_weight": 0.5}, {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL"}),
        ("kl", {"retain_weight": 0.5}, {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "KL"}),
        ("npo", {"beta": 0.1, "retain_weight": 1.0},
         {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}),
        ("simnpo", {"beta": 4.5, "gamma": 0.0, "retain_weight": 1.0},
         {"beta": 4.5, "delta": 0.0, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}),
        ("idkdpo", {"beta": 0.1, "retain_weight": 1.0},
         {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}),
        ("rmu", {"layer": 1}, {"gamma": 1.0, "alpha": 1.0, "steering_coeff": 2.0, "retain_loss_type": "EMBED_DIFF"}),
        ("undial", {}, {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss_type": "NLL"}),
        ("undial", {"retain_weight": 0.5}, {"beta": 10.0, "gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL"}),
        ("wga", {}, {"beta": 1.0, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}),
        ("satimp", {}, {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0, "retain_loss_type": "NLL"}),
    ]


def ou_trainer(cls: type, model: torch.nn.Module, ref: torch.nn.Module, attrs: dict[str, Any], rmu_layer: int) -> Any:
    trainer = object.__new__(cls)  # no Trainer.__init__: compute_loss reads only these attributes
    trainer.model, trainer.ref_model = model, ref
    for key, value in attrs.items():
        setattr(trainer, key, value)
    if cls.__name__ == "RMU":
        regex = rf"model\.layers\.{rmu_layer}"
        trainer.model_module = trainer._get_matching_module(model, regex)
        trainer.ref_module = trainer._get_matching_module(ref, regex)
        trainer.control_vec = None
    return trainer


def loss_and_grad(fn: Any, model: torch.nn.Module) -> tuple[float, torch.Tensor]:
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss = fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    return float(loss.detach()), flat.double()


def default_checks(root: Path) -> dict[str, dict[str, Any]]:
    """uipe's defaults beside open-unlearning's configs/trainer/<Method>.yaml (method_args) for the new methods."""
    from uipe.methods import OBJECTIVES

    names = {"rmu": ("RMU", {"steering_coeff": "steering_coeff", "forget_weight": "gamma", "retain_weight": "alpha"}),
             "undial": ("UNDIAL", {"beta": "beta", "forget_weight": "gamma", "retain_weight": "alpha"}),
             "wga": ("WGA", {"beta": "beta", "forget_weight": "gamma", "retain_weight": "alpha"}),
             "satimp": ("SatImp", {"beta1": "beta1", "beta2": "beta2", "forget_weight": "gamma",
                                   "retain_weight": "alpha"})}
    out = {}
    for method, (yaml_name, mapping) in names.items():
        theirs = yaml.safe_load((root / "configs" / "trainer" / f"{yaml_name}.yaml").read_text())["method_args"]
        ours = OBJECTIVES[method].params()
        out[method] = {k: {"uipe": getattr(ours, k), "open_unlearning": theirs.get(v),
                           "same": float(getattr(ours, k)) == float(theirs.get(v))} for k, v in mapping.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--open-unlearning", required=True, type=Path, help="a checkout of locuslab/open-unlearning")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    trainers = import_open_unlearning(args.open_unlearning)

    from uipe.methods import OBJECTIVES, Batch
    from uipe.methods.common import answer_token_logprobs
    from uipe.methods.rmu import control_vector

    data = {}
    for kind in ("qa", "full"):
        forget, retain, idk = make_batch(1, kind), make_batch(2, kind), make_batch(3, kind)
        idk["input_ids"][:, :4] = forget["input_ids"][:, :4]  # the same questions, other answers
        data[kind] = forget, retain, idk
    model, ref = tiny_models([b for kind in data.values() for b in kind])
    with torch.no_grad():
        token_p = answer_token_logprobs(ref(**data["qa"][0]).logits, data["qa"][0]["labels"]).exp()
    print(f"theta_ini's forget answer-token p: mean {float(token_p.mean()):.3f}, min {float(token_p.min()):.3f}")
    rows, unexpected = [], []
    for kind, (forget, retain, idk) in data.items():
        for method, ours, theirs in cases():
            objective = OBJECTIVES[method]
            params = objective.params(**ours)
            batch = Batch(forget=forget, retain=retain, idk=idk)
            l_u, g_u = loss_and_grad(lambda: objective.compute(model, ref, batch, params)[0], model)
            trainer = ou_trainer(trainers[method], model, ref, theirs, ours.get("layer", 0))
            inputs = {"forget": {"original": forget, "alternate": idk} if method == "idkdpo" else forget,
                      "retain": retain}
            if method == "rmu":  # its own draw (torch.rand after manual_seed), checked against uipe's
                torch.manual_seed(params.seed)
                drawn = trainer.get_control_vector(model.config.hidden_size)
                assert torch.equal(drawn, control_vector(params.seed, model.config.hidden_size, 2.0)), "direction"
            l_o, g_o = loss_and_grad(lambda: trainer.compute_loss(model, inputs), model)
            loss_rel = abs(l_u - l_o) / max(abs(l_o), 1e-30)
            grad_rel = float((g_u - g_o).norm() / g_o.norm().clamp_min(1e-30))
            ok = loss_rel <= args.rtol and grad_rel <= args.rtol
            label = method + ("" if ours.keys() <= {"layer"} or method != "undial" else " (retain 0.5)")
            why = DOCUMENTED.get((method, kind), "")
            rows.append({"method": label, "batch": kind, "loss_uipe": l_u, "loss_open_unlearning": l_o,
                         "loss_rel": loss_rel, "grad_rel": grad_rel, "agree": ok, "documented": why})
            if not ok and not why:
                unexpected.append(f"{label}/{kind}")
    print(f"{'method':<22}{'batch':<6}{'loss uipe':>14}{'loss o-u':>14}{'loss rel':>11}{'grad rel':>11}  agree")
    for r in rows:
        verdict = "yes" if r["agree"] else "no: " + (r["documented"] or "UNEXPECTED")
        print(f"{r['method']:<22}{r['batch']:<6}{r['loss_uipe']:>14.7g}{r['loss_open_unlearning']:>14.7g}"
              f"{r['loss_rel']:>11.2e}{r['grad_rel']:>11.2e}  {verdict}")
    defaults = default_checks(args.open_unlearning)
    for method, fields in defaults.items():
        print(f"defaults {method}: " + ", ".join(f"{k} {v['uipe']} vs {v['open_unlearning']}"
                                                 f"{'' if v['same'] else ' DIFFER'}" for k, v in fields.items()))
    if args.json:
        args.json.write_text(json.dumps({"rtol": args.rtol, "rows": rows, "defaults": defaults}, indent=1))
    if unexpected:
        print(f"parity fails beyond the documented differences: {', '.join(unexpected)}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
