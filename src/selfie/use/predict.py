"""`selfie predict`: a finetuned classifier applied to a folder of images or a test split.

The CSV has one row per image: its path (relative to --data-dir) or its index in the split,
`label` (the true class, where the image sits in a class folder of the run or comes from a
labelled split), `prediction` (the class name of the arg-max), one column `p_<class>` per
class with the softmax probability, and `error` (why a file did not decode; its other
columns are then empty).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from selfie.checkpoint import atomic_write, describe_write_error
from selfie.errors import UserError
from selfie.evaluation import forward_batches
from selfie.use.images import UNKNOWN, open_input
from selfie.use.run import open_trained

BATCH = 256  # images per forward pass


@dataclass
class Prediction:
    out: Path
    description: str  # what was classified
    rows: int
    errors: int
    accuracy: float | None  # over the rows whose class is known
    labelled: int  # rows whose class is known


def predict(
    run_path: str | Path,
    data_dir: str | None,
    out: str | Path,
    device: str = "auto",
    batch_size: int = BATCH,
    progress: bool = True,
) -> Prediction:
    run = open_trained(run_path, device, expect="finetune", what="predict")
    source = open_input(run, data_dir)
    out = Path(out)
    header = [source.name_column, "label", "prediction"]
    header += [f"p_{c}" for c in run.classes] + ["error"]
    rows: list[list[str]] = []
    correct, labelled, errors = 0, 0, 0

    def name_of(label: int) -> str:
        return "" if label == UNKNOWN else run.classes[label]

    for batch in source.batches(run, batch_size, progress):
        for name, why in batch.errors:
            rows.append([name, "", ""] + [""] * len(run.classes) + [why])
            errors += 1
        if not batch.names:
            continue
        one = [(batch.images, batch.labels)]
        logits, labels = next(forward_batches(run.model, one, run.mean, run.std))
        probs = torch.softmax(logits, dim=-1).cpu()
        picked = probs.argmax(-1).tolist()
        for name, label, k, p in zip(batch.names, labels.tolist(), picked, probs, strict=True):
            rows.append([name, name_of(label), run.classes[k], *(f"{v:.6f}" for v in p), ""])
            if label != UNKNOWN:
                labelled += 1
                correct += int(k == label)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as e:
        what, fix = describe_write_error(e)
        raise UserError(f"{what} while writing {out}; {fix} and run again") from None
    return Prediction(
        out=out,
        description=source.description,
        rows=len(rows),
        errors=errors,
        accuracy=correct / labelled if labelled else None,
        labelled=labelled,
    )
