"""The weighted form's importance: diagonal Fisher estimates of the forget and the retain loss at theta_un.

For each tensor element, f = mean over items of (d loss_item / d theta)^2, the empirical Fisher's diagonal, with
loss_item an item's mean answer-token NLL (the loss the base methods ascend or descend), at one epoch's theta_un.
The weighted form scales UIPE's step per element by s = f_forget / (f_forget + retain_lambda * f_retain) (uipe.
coefficients; "per-parameter task arithmetic", arXiv 2601.22030), so retain_lambda can be searched without
estimating again. One scoring pass per candidate epoch (every forget item, as many retain items, one backward pass
each), run as a Ray task with a trial's resources, cached by identity beside the epoch's checkpoint:

    unlearn/<method>/importance/epoch_03/model.safetensors   f_forget.<tensor>, f_retain.<tensor> (fp32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uipe.console import say
from uipe.search.trial import TrialSetup
from uipe.stages import reuse_or_build

ESTIMATOR = "empirical Fisher diagonal: mean of squared per-item gradients of the mean answer NLL, at theta_un"


def importance_folder(epoch_dir: str | Path) -> Path:
    """Where an epoch's estimates live: beside the epoch folders, not in them (a model folder's files are its
    identity)."""
    epoch_dir = Path(epoch_dir)
    return epoch_dir.parent / "importance" / epoch_dir.name


def ensure_importance(setup: TrialSetup, epochs: list[int], items: int, cpus: float, gpus: float) -> dict[int, str]:
    """Each candidate epoch's importance folder, estimated where missing or made from other inputs."""
    from uipe.eval.reference import model_hash

    out = {}
    for epoch in epochs:
        folder = importance_folder(setup.epoch_dirs[epoch])
        want = {"theta_un": model_hash(setup.epoch_dirs[epoch]), "data": setup.data, "forget_split": setup.forget_split,
                "items": items, "template": setup.template, "max_length": setup.max_length, "estimator": ESTIMATOR}
        out[epoch] = str(reuse_or_build(folder, want, lambda tmp, e=epoch: _estimate(setup, e, items, tmp, cpus, gpus)))
    return out


def _estimate(setup: TrialSetup, epoch: int, items: int, tmp: Path, cpus: float, gpus: float) -> None:
    import ray

    say(f"[importance] epoch {epoch}: Fisher diagonals of the forget and retain losses ({items} items each)")
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(estimate_to_folder)
    ray.get(task.remote(setup, epoch, items, str(tmp)))


def estimate_to_folder(setup: TrialSetup, epoch: int, items: int, folder: str) -> None:
    """Load theta_un of `epoch`, estimate both diagonals, write them as one safetensors file in `folder`."""
    import torch
    from safetensors.torch import save_file

    from uipe.benchmarks import get_benchmark
    from uipe.models import default_device, load_model, load_tokenizer
    from uipe.prompts import encode_qa

    torch.set_num_threads(setup.threads)
    device = default_device()
    model = load_model(setup.epoch_dirs[epoch], dtype="float32", device=device)
    tokenizer = load_tokenizer(setup.theta_ini)
    forget, retain, _ = get_benchmark(setup.benchmark).unlearning_records(setup.data, setup.forget_split, False)
    n = min(items, len(forget))

    def encoded(records: list[Any]) -> list[tuple[list[int], list[int]]]:
        return [encode_qa(tokenizer, r.question, r.answer, setup.template, setup.max_length) for r in records]

    tensors = {}
    for prefix, examples in (("f_forget.", encoded(forget[:n])), ("f_retain.", encoded(retain[:n]))):
        tensors |= {prefix + k: v for k, v in fisher_diagonal(model, examples, tokenizer.pad_token_id).items()}
    save_file(tensors, Path(folder) / "model.safetensors", metadata={"format": "pt"})


def fisher_diagonal(model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """name -> mean over examples of the squared gradient of the example's mean answer NLL, in fp32 on the CPU,
    for every name of the model's state_dict (a tied alias gets its parameter's; a buffer gets zeros: it does not
    move under the weighted form)."""
    import torch

    from uipe.methods import mean_nll
    from uipe.methods.common import logits_of
    from uipe.prompts import collate

    params = dict(model.named_parameters(remove_duplicate=False))
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params.values()}
    model.eval()  # no dropout: the estimate depends on the weights and the data only
    for example in examples:
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate([example], pad_id).items()}
        model.zero_grad(set_to_none=True)
        mean_nll(logits_of(model, batch), batch["labels"]).backward()
        for p in dict.fromkeys(params.values()):
            if p.grad is not None:
                sums[id(p)].add_(p.grad.detach().float().square())
    model.zero_grad(set_to_none=True)
    count = max(1, len(examples))
    out = {name: (sums[id(p)] / count).cpu().contiguous() for name, p in params.items()}
    for name, buf in model.state_dict().items():
        if name not in out:
            out[name] = torch.zeros(buf.shape, dtype=torch.float32)
    return out
