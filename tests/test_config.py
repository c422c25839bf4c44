"""Configuration loading, overrides and one-line errors (CLI exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uipe.config import load_config, preset_path
from uipe.errors import UipeError


def test_tiny_preset_loads_and_overrides_apply() -> None:
    cfg = load_config(None, ["unlearn.lr=2e-5", "unlearn.methods=[npo]", "unlearn.npo.beta=0.5"])
    assert cfg.name == "tiny" and cfg.data.forget_split == "forget05"
    assert (cfg.unlearn.lr, cfg.unlearn.methods, cfg.unlearn.npo.beta) == (2e-5, ["npo"], 0.5)
    assert cfg.method_params("graddiff").retain_weight == 1.0
    # YAML reads yes/no as booleans; train.use_gpu takes them as its words
    assert [load_config(None, [f"train.use_gpu={v}"]).train.use_gpu for v in ("yes", "no", "auto")] == [
        "yes", "no", "auto"]


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("name: x\nmodle: {}\n", [], "modle: unknown key"),
        ("unlearn: {lr: -1}\n", [], "unlearn.lr: Input should be greater than 0"),
        ("data: {forget_split: forget07}\n", [], "data.forget_split: Input should be 'forget01'"),
        ("name: x\n", ["train.nope=1"], "train.nope: unknown key"),
        ("train: {micro_batch_size: 16, num_workers: 3}\n", [], "must be a multiple of"),
        ("name: [unclosed\n", [], "not valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_the_file(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(UipeError, match=message) as err:
        load_config(path, overrides)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_config_show_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain: {num_wrokers: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "uipe.cli", "config", "show", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"uipe: error: {path}: train.num_wrokers: unknown key"
    assert "Traceback" not in proc.stderr


def test_cli_config_show_prints_the_resolved_config() -> None:
    proc = subprocess.run([sys.executable, "-m", "uipe.cli", "config", "show", "--set", "unlearn.epochs=7"],
                          capture_output=True, text=True, timeout=120, check=True)
    cfg = load_config(None, ["unlearn.epochs=7"])
    import yaml

    assert yaml.safe_load(proc.stdout) == cfg.model_dump(mode="json")
    assert preset_path().is_file()


def test_cli_help_lists_every_subcommand() -> None:
    proc = subprocess.run([sys.executable, "-m", "uipe.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=True)
    for cmd in ("config", "data", "prepare", "unlearn", "extrapolate", "evaluate", "reference", "tofu-report",
                "search", "run"):
        assert cmd in proc.stdout


def test_cli_data_synth_writes_all_splits_deterministically(tmp_path: Path) -> None:
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "uipe.cli", "data", "synth", "--out", str(tmp_path / name), "--seed",
                        "0", "--authors", "40"], check=True, capture_output=True, timeout=120)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 19 + 6  # + holdout01/05/10 and _perturbed
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    again = subprocess.run([sys.executable, "-m", "uipe.cli", "data", "synth", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
