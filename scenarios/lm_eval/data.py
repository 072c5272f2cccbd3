"""Datasets of the offline lm-eval tasks, read from HELM's scenario-cache files rather than the Hugging Face Hub.

The task YAMLs name these functions as `custom_dataset`; lm-eval calls them with the task's
`dataset_kwargs` and the run's metadata (which holds --metadata and the model_args, hence `**_`).
The data folder is `data_dir` from `--metadata '{"data_dir": ...}'`, else $FLEXHELM_DATA_DIR, else
../shared/data/helm-scenarios beside the repository.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets

from engine.errors import UserError

DATA_ENV = "FLEXHELM_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "helm-scenarios"
MMLU_SPLITS = ("dev", "val", "test")


def find_data_dir(given: str | os.PathLike | None = None) -> Path:
    folder = Path(given or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    if not folder.is_dir():
        raise UserError(f"offline lm-eval data not found at {folder}; pass --metadata '{{\"data_dir\": DIR}}' or "
                        f"set {DATA_ENV} to a folder laid out like ../shared/data/helm-scenarios")
    return folder


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path} is missing; the offline data folder is incomplete")
    return path


def mmlu(subject: str, data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """One MMLU subject: headerless CSV rows (question, A, B, C, D, answer letter) as lm-eval's mmlu columns."""
    root = find_data_dir(data_dir) / "mmlu" / "data"
    splits = {}
    for split in MMLU_SPLITS:
        with _need(root / split / f"{subject}_{split}.csv").open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        splits[split] = datasets.Dataset.from_dict({
            "question": [r[0] for r in rows], "subject": [subject] * len(rows),
            "choices": [r[1:5] for r in rows], "answer": ["ABCD".index(r[5].strip()) for r in rows]})
    return datasets.DatasetDict(splits)


def gsm8k(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """GSM8K's train and test problems (JSON lines with question and worked answer)."""
    root = find_data_dir(data_dir) / "gsm"
    splits = {}
    for split in ("train", "test"):
        lines = _need(root / f"gsm_data_{split}").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        splits[split] = datasets.Dataset.from_dict({"question": [r["question"] for r in rows],
                                                    "answer": [r["answer"] for r in rows]})
    return datasets.DatasetDict(splits)
