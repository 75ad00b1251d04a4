"""The contract of Cohort's ``training.runtime: command``, read and written.

Cohort's executor runs the job's ``training.command`` with these environment variables
(see the package README and Cohort's README, "Bring your own training code"):

- ``COHORT_TASK_KIND``: ``train`` or ``evaluate``
- ``COHORT_INPUT_MODEL``: the global model, safetensors (float32)
- ``COHORT_OUTPUT_MODEL``: (train) where to write the trained model, the same tensors
- ``COHORT_OUTPUT_METRICS``: where to write ``{"samples", "loss", "accuracy"}`` as JSON
- ``COHORT_DATASET``: the party's dataset entry (JSON)
- ``COHORT_HYPERPARAMETERS``: the task's settings (JSON)
- ``COHORT_SCRATCH_DIR``: a directory of the task's own

The executor checks what the command wrote (the model's names, shapes and finiteness, the
metrics' bounds) and fails the task naming what is wrong; this package checks the same
before writing, so the command fails early with a clear message.

Depends on the standard library, numpy and safetensors only.
"""

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["Task", "ContractError", "load_dataset", "ENV"]

ENV = {
    "kind": "COHORT_TASK_KIND",
    "input_model": "COHORT_INPUT_MODEL",
    "output_model": "COHORT_OUTPUT_MODEL",
    "output_metrics": "COHORT_OUTPUT_METRICS",
    "dataset": "COHORT_DATASET",
    "hyperparameters": "COHORT_HYPERPARAMETERS",
    "scratch_dir": "COHORT_SCRATCH_DIR",
}


class ContractError(Exception):
    """The environment or an output does not keep the contract; the message names it."""


def _env(name: str, env) -> str:
    value = env.get(name)
    if value is None or value == "":
        raise ContractError(f"{name} is not set: is this run by Cohort's executor?")
    return value


def _json_env(name: str, env) -> dict:
    try:
        value = json.loads(_env(name, env))
    except json.JSONDecodeError as e:
        raise ContractError(f"{name} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ContractError(f"{name} is not a JSON object")
    return value


@dataclass
class Task:
    """One task handed to the command by Cohort's executor."""

    kind: str
    input_model: str
    output_metrics: str
    dataset: dict
    hyperparameters: dict
    scratch_dir: str
    output_model: Optional[str] = None
    _input_layout: Dict[str, Tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env=None) -> "Task":
        """The task the ``COHORT_*`` environment variables describe."""
        env = os.environ if env is None else env
        kind = _env(ENV["kind"], env)
        if kind not in ("train", "evaluate"):
            raise ContractError(f"{ENV['kind']} is {kind!r}, expected train or evaluate")
        return cls(
            kind=kind,
            input_model=_env(ENV["input_model"], env),
            output_model=_env(ENV["output_model"], env) if kind == "train" else None,
            output_metrics=_env(ENV["output_metrics"], env),
            dataset=_json_env(ENV["dataset"], env),
            hyperparameters=_json_env(ENV["hyperparameters"], env),
            scratch_dir=_env(ENV["scratch_dir"], env),
        )

    # Hyperparameters, with the defaults Cohort's spec has.
    @property
    def epochs(self) -> int:
        return int(self.hyperparameters.get("epochs", 1))

    @property
    def batch_size(self) -> int:
        return int(self.hyperparameters.get("batch_size", 32))

    @property
    def lr(self) -> float:
        return float(self.hyperparameters.get("optimizer", {}).get("lr", 0.05))

    @property
    def seed(self) -> int:
        return int(self.hyperparameters.get("seed", 0))

    def load_model(self) -> Dict[str, np.ndarray]:
        """The global model: tensor name -> float32 array."""
        tensors = load_file(self.input_model)
        self._input_layout = {name: tuple(t.shape) for name, t in tensors.items()}
        return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}

    def load_data(self, split: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Features (float32, [n, d], scaled as the entry says) and labels (int64, [n]).

        ``split``: ``"train"`` or ``"eval"``; default: the task's (the held-out split, when
        the entry has one, for an evaluation)."""
        if split is None:
            split = "eval" if self.kind == "evaluate" else "train"
        return load_dataset(self.dataset, split)

    def save_model(self, tensors: Dict[str, np.ndarray]) -> None:
        """Writes the trained model: the global model's tensors, same shapes, finite."""
        if self.output_model is None:
            raise ContractError("an evaluation task writes no model, only metrics")
        if not self._input_layout:
            self.load_model()
        out = {}
        for name, shape in self._input_layout.items():
            if name not in tensors:
                raise ContractError(f"the model lacks tensor {name!r}")
            t = np.ascontiguousarray(tensors[name], dtype=np.float32)
            if tuple(t.shape) != shape:
                raise ContractError(f"tensor {name!r} has shape {t.shape}, the model's is {shape}")
            if not np.all(np.isfinite(t)):
                what = "NaN" if np.isnan(t).any() else "an infinite value"
                raise ContractError(f"tensor {name!r} holds {what}")
            out[name] = t
        extra = set(tensors) - set(self._input_layout)
        if extra:
            raise ContractError(f"tensors {sorted(extra)} are not in the model")
        save_file(out, self.output_model)

    def write_metrics(self, samples: int, loss: Optional[float] = None,
                      accuracy: Optional[float] = None) -> None:
        """Writes ``{"samples", "loss", "accuracy"}``; an evaluation needs all three."""
        if isinstance(samples, bool) or int(samples) != samples or not 1 <= samples <= 1 << 40:
            raise ContractError(f"samples must be a whole number from 1 to 2^40, got {samples!r}")
        metrics = {"samples": int(samples)}
        if self.kind == "evaluate" and (loss is None or accuracy is None):
            raise ContractError("an evaluation reports loss and accuracy")
        if loss is not None:
            loss = float(loss)
            if not (math.isfinite(loss) and loss >= 0.0):
                raise ContractError(f"loss must be finite and at least 0, got {loss}")
            metrics["loss"] = loss
        if accuracy is not None:
            accuracy = float(accuracy)
            if not 0.0 <= accuracy <= 1.0:
                raise ContractError(f"accuracy must be in [0, 1], got {accuracy}")
            metrics["accuracy"] = accuracy
        with open(self.output_metrics, "w", encoding="utf-8") as f:
            json.dump(metrics, f)


def load_dataset(entry: dict, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """A ``datasets.json`` entry's data as Cohort's trainer reads it: csv (label last, an
    optional header row), npy or idx (features and a labels file); features times
    ``scale`` (default 1, or 1/255 for idx), flattened to [n, d]."""
    if split not in ("train", "eval"):
        raise ContractError(f"split must be train or eval, got {split!r}")
    fmt = entry.get("format", "")
    path, labels = entry.get("path", ""), entry.get("labels", "")
    if split == "eval" and entry.get("eval_path"):
        path, labels = entry["eval_path"], entry.get("eval_labels", "")
    if not path:
        raise ContractError(f"dataset {entry.get('name')!r} has no path")
    if fmt == "csv":
        x, y = _read_csv(path)
    elif fmt in ("npy", "idx"):
        if not labels:
            raise ContractError(f"{fmt} dataset {path} needs a labels file")
        read = np.load if fmt == "npy" else _read_idx
        x, y = read(path), read(labels)
    else:
        raise ContractError(f"dataset format {fmt!r} is not csv, npy or idx")
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(x) != len(y):
        raise ContractError(f"{path}: {len(x)} samples but {len(y)} labels")
    scale = entry.get("scale") or (1.0 / 255.0 if fmt == "idx" else 1.0)
    return x * np.float32(scale), y


def _read_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            fields = line.split(",")
            try:
                rows.append([float(v) for v in fields])
            except ValueError:
                if i == 0:
                    continue  # header row
                raise ContractError(f"{path} line {i + 1}: not numbers") from None
    if not rows:
        raise ContractError(f"{path}: no data rows")
    data = np.asarray(rows, dtype=np.float64)
    return data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ContractError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    return data.reshape(dims)
