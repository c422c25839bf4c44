"""Where each stage reads and writes under a run folder, so stages chain by folder.

runs/<name>/
  data/                        TOFU-format splits (synthesised, or a copy/pointer for external data)
  models/base/                 theta_0 of the embedded model (random init + local tokenizer)
  models/target/, retain/      TOFU's two reference models (uipe prepare)
  retain_reference.json        the retain model's evaluation, cached for forget quality
  unlearn/<method>/epoch_XX/   one HF model folder per epoch, manifest.json beside them (uipe unlearn)
  search/<method>/             Tune results, tables, plots, the chosen model (uipe search)
  mlflow.db, mlartifacts/      the default MLflow store
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunPaths:
        return cls(Path(run_dir).resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    @property
    def target_model(self) -> Path:
        return self.root / "models" / "target"

    @property
    def retain_model(self) -> Path:
        return self.root / "models" / "retain"

    @property
    def retain_reference(self) -> Path:
        return self.root / "retain_reference.json"

    def unlearn(self, method: str) -> Path:
        return self.root / "unlearn" / method

    def epoch_dir(self, method: str, epoch: int) -> Path:
        return self.unlearn(method) / f"epoch_{epoch:02d}"

    def manifest(self, method: str) -> Path:
        return self.unlearn(method) / "manifest.json"

    def search(self, label: str) -> Path:
        """A search's folder: search/<method> for the global form, search/<method>-<form> for another
        (SearchSpace.label)."""
        return self.root / "search" / label

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"
