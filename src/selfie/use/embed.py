"""`selfie embed`: the pooled features of a run's network for every image, in one .npz.

Arrays: `features` float32 (N, D), `paths` (N,) strings (a path relative to --data-dir, or
the index in the split), `labels` int64 (N,) (-1 where the class is not known) and
`classes` (the run's class names, which the labels index). A pretraining run gives P's
features on the whole image (the stem and stages 1-3, final BN-ReLU, mean over positions:
what finetuning's transferred stages compute); a finetuning run gives the input of its
classifier. Files that do not decode are listed in `failed`, with `failed_why`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfie.checkpoint import atomic_write, describe_write_error
from selfie.errors import UserError
from selfie.evaluation import features
from selfie.use.images import open_input
from selfie.use.run import TrainedRun, open_trained

BATCH = 256


@dataclass
class Embedding:
    out: Path
    description: str
    shape: tuple[int, int]
    labelled: int
    failed: int
    kind: str


def embed_arrays(
    run: TrainedRun, data_dir: str | None, batch_size: int = BATCH, progress: bool = True
) -> dict[str, np.ndarray]:
    """The arrays of the module docstring (with `description` for messages)."""
    source = open_input(run, data_dir)
    net = run.backbone()
    feats, labels, names, failed = [], [], [], []
    for batch in source.batches(run, batch_size, progress):
        failed += batch.errors
        if not batch.names:
            continue
        f, y = features(net, [(batch.images, batch.labels)], run.mean, run.std)
        feats.append(f.numpy())
        labels.append(y.numpy())
        names += batch.names
    if not feats:
        raise UserError(f"none of the {source.total} images decoded; nothing to embed")
    return {
        "features": np.concatenate(feats).astype(np.float32),
        "paths": np.array(names),
        "labels": np.concatenate(labels).astype(np.int64),
        "classes": np.array(run.classes),
        "failed": np.array([n for n, _ in failed]),
        "failed_why": np.array([w for _, w in failed]),
        "description": np.array(source.description),
    }


def embed(
    run_path: str | Path,
    data_dir: str | None,
    out: str | Path,
    device: str = "auto",
    batch_size: int = BATCH,
    progress: bool = True,
) -> Embedding:
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: give a file name ending in .npz")
    run = open_trained(run_path, device)
    arrays = embed_arrays(run, data_dir, batch_size, progress)
    description = str(arrays.pop("description"))
    buffer = io.BytesIO()
    np.savez(buffer, **dict[str, Any](arrays))
    try:
        atomic_write(out, lambda f: f.write(buffer.getvalue()))
    except OSError as e:
        what, fix = describe_write_error(e)
        raise UserError(f"{what} while writing {out}; {fix} and run again") from None
    n, d = arrays["features"].shape
    return Embedding(
        out=out,
        description=description,
        shape=(n, d),
        labelled=int((arrays["labels"] >= 0).sum()),
        failed=len(arrays["failed"]),
        kind=run.kind,
    )
