"""`selfie probe`: frozen-feature evaluation of a pretraining run.

P (applied to whole images, as finetuning applies the stages it transfers) is frozen; its
pooled features of a class-balanced labelled subset of the training split (drawn as
finetuning draws it, from finetune.subset_seed) train
- a linear probe: scikit-learn's multinomial LogisticRegression (lbfgs, C = 1) on the
  features standardised with the subset's mean and std, and
- weighted kNN with k = 20 and k = 200 (cosine similarity, votes weighted exp(s / 0.07): the
  InstDisc / DINO kNN monitor, see selfie.knn),
and each is scored once on the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfie.data.source import open_source
from selfie.data.subsets import balanced_subset, parse_amount
from selfie.errors import UserError
from selfie.evaluation import features
from selfie.knn import TEMPERATURE, has_labels, knn_accuracy
from selfie.use.run import open_trained

KS = (20, 200)
BATCH = 500


@dataclass
class ProbeResult:
    run: str
    labels: str  # the amount asked for
    train_images: int  # the labelled subset
    test_images: int
    feature_dim: int
    linear_acc: float
    knn_acc: dict[int, float]  # k -> accuracy
    chance: float
    knn_temperature: float = TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["knn_acc"] = {str(k): v for k, v in self.knn_acc.items()}
        return d


def linear_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> float:
    """Logistic regression on standardised features; test top-1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise UserError("the labelled subset holds one class; a probe needs at least two")
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def probe(
    run_path: str | Path,
    labels: str = "1.0",
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    run = open_trained(run_path, device, expect="pretrain", what="probe")
    amount = parse_amount(labels)
    d = run.config.data
    root = data_dir if data_dir is not None else run.data_dir
    train = open_source(d, "train", root)
    if not has_labels(train):
        raise UserError(
            f"the training images of {run.path} have no labels (one class, "
            f"{train.classes[0]!r}); a probe needs class sub-folders"
        )
    test = open_source(d, "test", root)
    subset = balanced_subset(
        train.labels, amount, len(train.classes), run.config.finetune.subset_seed
    )
    net = run.backbone()
    train_x, train_y = features(
        net, train.eval_batches(run.device, BATCH, subset), run.mean, run.std
    )
    test_x, test_y = features(net, test.eval_batches(run.device, BATCH), run.mean, run.std)
    k_classes = len(train.classes)
    knn = {k: knn_accuracy(train_x, train_y, test_x, test_y, k, k_classes) for k in KS}
    linear = linear_probe_accuracy(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy())
    return ProbeResult(
        run=str(run.path),
        labels=labels,
        train_images=len(subset),
        test_images=len(test_y),
        feature_dim=int(train_x.shape[1]),
        linear_acc=linear,
        knn_acc=knn,
        chance=float(torch.bincount(test_y).max()) / max(1, len(test_y)),
    )
