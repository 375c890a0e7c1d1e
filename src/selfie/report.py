"""The paper's Table 1, Table 2 and Figure 4 from finetuning results (SPEC 5-6).

A result row is one finetuning run: {"head", "labels", "fraction", "arm", "seed", "test_acc"}
plus optional "lr", "val_acc", "run", "visible" (the pretrained arm's p, when it was tuned),
"labelled_images" and "unlabelled_images" (those its weights were pretrained on; 0 from
scratch). Rows are grouped into one `Cell` per (head, labels):
the test accuracies of the scratch and pretrained arms, in percent, with the statistics the
paper reports (mean ± sample std over seeds) and two it only implies (the std ratio behind
"std 3x lower", and Welch's t-test for whether the difference is more than seed noise).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullLocator

from selfie.errors import UserError

ARMS = ("scratch", "pretrained")
ARM_NAMES = {"scratch": "supervised (scratch)", "pretrained": "Selfie pretrained"}
HEAD_ORDER = ("resnet50", "attention")
# The paper's names; at paper size the whole ResNet is a ResNet-50 and P a "ResNet-36".
HEAD_NAMES = {
    "resnet50": "whole ResNet (ResNet-50 at paper size)",
    "attention": "P + attention pooling (ResNet-36 + A at paper size)",
}
REQUIRED_KEYS = ("head", "labels", "fraction", "arm", "seed", "test_acc")
TUNING_KEYS = ("head", "labels", "arm", "lr", "val_acc")
# The paper's Table 1 (SPEC 6; ResNet-50, mean and std over 5 runs, in %): dataset ->
# labelled fraction -> ((scratch mean, std), (Selfie mean, std)). Shown beside our numbers.
PAPER_TABLE1: dict[str, dict[float, tuple[tuple[float, float], tuple[float, float]]]] = {
    "cifar10": {
        0.05: ((75.9, 0.7), (75.9, 0.4)),
        0.08: ((79.3, 1.0), (80.3, 0.3)),
        0.2: ((88.3, 0.3), (89.1, 0.5)),
        1.0: ((95.5, 0.2), (95.7, 0.1)),
    },
    "imagenet32": {
        0.05: ((13.1, 0.8), (18.3, 0.1)),
        0.1: ((25.9, 0.5), (30.2, 0.5)),
        0.2: ((32.7, 0.4), (33.5, 0.2)),
        1.0: ((55.7, 0.6), (56.4, 0.6)),
    },
    "imagenet224": {
        0.05: ((35.6, 0.7), (46.7, 0.4)),
        0.1: ((59.6, 0.2), (61.9, 0.2)),
        0.2: ((65.7, 0.7), (67.1, 0.2)),
        1.0: ((76.9, 0.2), (77.0, 0.1)),
    },
}
DASH = "—"


def read_lines(path: Path, required: tuple[str, ...] = TUNING_KEYS) -> list[dict]:
    """One dict per non-blank line of a .jsonl file, each holding the `required` keys and an
    arm from ARMS."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    return [
        _parse_row(line, path, number, required)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def read_results(path: Path) -> list[dict]:
    """One dict per non-blank line of results.jsonl."""
    rows = read_lines(path, REQUIRED_KEYS)
    if not rows:
        raise UserError(f"no results yet in {path}; run some finetuning experiments first")
    return rows


def _parse_row(line: str, path: Path, number: int, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number} is not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{path} line {number} is not a JSON object")
    missing = [k for k in required if k not in row]
    if missing:
        raise UserError(f"{path} line {number} lacks {', '.join(missing)}")
    if row["arm"] not in ARMS:
        raise UserError(f"{path} line {number}: arm {row['arm']!r} is not one of {ARMS}")
    return row


# --- statistics -----------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _std(values: list[float]) -> float:
    # Sample std (ddof=1), as papers report over seeds; undefined for a single run.
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


@dataclass(frozen=True)
class Cell:
    """One (head, labels) row of Table 1; accuracies in percent, one entry per seed."""

    head: str
    labels: str
    fraction: float
    scratch: list[float]
    pretrained: list[float]
    labelled_images: int | None = None  # the subset's size
    unlabelled_images: int | None = None  # the pretrained arm's pretraining images
    visible: tuple[float, ...] = ()  # the pretrained arm's p, when it was tuned

    @property
    def images(self) -> str:
        """ "50,000 / 2,500 (20x)": unlabelled / labelled images and their ratio."""
        if self.labelled_images is None:
            return DASH
        if self.unlabelled_images is None:
            return f"? / {self.labelled_images:,}"
        ratio = self.unlabelled_images / max(1, self.labelled_images)
        return f"{self.unlabelled_images:,} / {self.labelled_images:,} ({ratio:.3g}x)"

    @property
    def scratch_mean(self) -> float:
        return _mean(self.scratch)

    @property
    def scratch_std(self) -> float:
        return _std(self.scratch)

    @property
    def pretrained_mean(self) -> float:
        return _mean(self.pretrained)

    @property
    def pretrained_std(self) -> float:
        return _std(self.pretrained)

    @property
    def difference(self) -> float:
        return self.pretrained_mean - self.scratch_mean

    @property
    def std_ratio(self) -> float:
        """How many times less the pretrained arm varies across seeds (paper: "3x lower")."""
        a, b = self.scratch_std, self.pretrained_std
        return a / b if b > 0 and not math.isnan(a) else math.nan

    @property
    def p_value(self) -> float:
        """Welch's two-sided t-test: the arms need not share a variance (pretraining lowers it)."""
        if len(self.scratch) < 2 or len(self.pretrained) < 2:
            return math.nan
        if self.scratch_std == 0 and self.pretrained_std == 0:
            return math.nan  # t is 0/0; scipy would warn and return nan anyway
        from scipy import stats  # scipy takes ~0.5 s to import; only the report needs it

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_ind(self.pretrained, self.scratch, equal_var=False)
        return float(result.pvalue)


def _head_key(head: str) -> tuple[int, str]:
    return (HEAD_ORDER.index(head) if head in HEAD_ORDER else len(HEAD_ORDER), head)


def summarize(rows: Iterable[dict]) -> list[Cell]:
    """Cells sorted by head (ResNet-50 first), then labelled fraction.

    A repeated (head, labels, arm, seed) keeps its last row, so rerunning a seed replaces
    its result instead of counting it twice.
    """
    latest: dict[tuple[str, str, str, int], dict] = {}
    for row in rows:
        if row["arm"] not in ARMS:
            raise UserError(f"result arm {row['arm']!r} is not one of {ARMS}")
        latest[(row["head"], row["labels"], row["arm"], int(row["seed"]))] = row
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for (head, labels, arm, _seed), row in latest.items():
        group = groups.setdefault((head, labels), {"fraction": float(row["fraction"])})
        group.setdefault(arm, []).append(100.0 * float(row["test_acc"]))
        if row.get("labelled_images") is not None:
            group["labelled_images"] = int(row["labelled_images"])
        if arm == "pretrained" and row.get("unlabelled_images") is not None:
            group["unlabelled_images"] = int(row["unlabelled_images"])
        if arm == "pretrained" and row.get("visible") is not None:
            group.setdefault("visible", set()).add(float(row["visible"]))
    cells = [
        Cell(
            head,
            labels,
            g["fraction"],
            g.get("scratch", []),
            g.get("pretrained", []),
            g.get("labelled_images"),
            g.get("unlabelled_images"),
            tuple(sorted(g.get("visible", ()), reverse=True)),
        )
        for (head, labels), g in groups.items()
    ]
    return sorted(cells, key=lambda c: (_head_key(c.head), c.fraction, c.labels))


# --- tables ---------------------------------------------------------------------------------


def _mean_std(mean: float, std: float) -> str:
    """ "75.9 ± 0.7"; a lone run has no std, so just "75.9"; no runs at all: a dash."""
    if math.isnan(mean):
        return DASH
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _signed(value: float) -> str:
    return DASH if math.isnan(value) else f"{value:+.1f}"


def _ratio(value: float) -> str:
    return DASH if math.isnan(value) else f"{value:.1f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _amount(labels: str) -> str:
    """A run's labels name as a reader writes it: "frac0.05" -> "5%", "25pc" -> "25/class",
    "file-1percent.txt" (a subset file's cell) -> "1percent.txt"."""
    if labels.startswith("frac"):
        return _percent(float(labels[4:]))
    if labels.startswith("file-"):
        return labels[5:]
    return f"{labels[:-2]}/class" if labels.endswith("pc") else labels


def _labelled(cell: Cell) -> str:
    """ "8%" for a fraction; "400/class (8%)" for a per-class count; "1percent.txt (1.28%)"
    for a subset file."""
    if cell.labels.startswith("frac"):
        return _percent(cell.fraction)
    return f"{_amount(cell.labels)} ({_percent(cell.fraction)})"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


PaperCell = tuple[tuple[float, float], tuple[float, float]]


def paper_cell(dataset: str | None, fraction: float) -> PaperCell | None:
    """The paper's ((scratch mean, std), (Selfie mean, std)) at this fraction, or None."""
    for paper_fraction, values in PAPER_TABLE1.get(dataset or "", {}).items():
        if math.isclose(fraction, paper_fraction, rel_tol=0.02):
            return values
    return None


def table_markdown(cells: list[Cell], head: str = "resnet50", dataset: str | None = None) -> str:
    """Table 1 for one head: test accuracy (%), mean ± sample std over seeds. With the
    dataset of one of the paper's rows, the whole-ResNet table also shows the paper's numbers."""
    mine = [c for c in cells if c.head == head]
    paper = head == "resnet50" and any(paper_cell(dataset, c.fraction) for c in mine)
    images = any(c.labelled_images is not None for c in mine)
    tuned_p = any(c.visible for c in mine)
    header = ["labelled", "n", ARM_NAMES["scratch"], ARM_NAMES["pretrained"]]
    header += ["difference", "std ratio", "Welch p"]
    header += ["images: unlabelled / labelled"] if images else []
    header += ["p (chosen)"] if tuned_p else []
    if paper:
        header += ["paper: supervised", "paper: Selfie"]
    rows = []
    for c in mine:
        row = [
            _labelled(c),
            f"{len(c.scratch)}/{len(c.pretrained)}",
            _mean_std(c.scratch_mean, c.scratch_std),
            _mean_std(c.pretrained_mean, c.pretrained_std),
            _signed(c.difference),
            _ratio(c.std_ratio),
            _p(c.p_value),
        ]
        row += [c.images] if images else []
        row += [", ".join(f"{p:g}" for p in c.visible) or DASH] if tuned_p else []
        if paper:
            ref = paper_cell(dataset, c.fraction)
            row += [_mean_std(*arm) for arm in ref] if ref else [DASH, DASH]
        rows.append(row)
    return _markdown(header, rows)


def tuning_markdown(rows: list[dict]) -> str:
    """Validation accuracy (%) of each tuning run: one row per (head, labels, arm) and, where
    the visible fraction p was tuned, per p; one column per peak LR. The chosen setting of
    each (head, labels, arm) in bold: the best, ties to the p tuned first, then the smaller LR
    (experiment.py's rule)."""
    lrs = sorted({float(r["lr"]) for r in rows})
    ps = list(dict.fromkeys(r.get("visible") for r in rows))  # in the order they were tuned
    tuned_p = any(p is not None for p in ps)
    groups: dict[tuple[str, str, str], dict[tuple[Any, float], float]] = {}
    for r in rows:
        key = (r["head"], r["labels"], r["arm"])
        groups.setdefault(key, {})[(r.get("visible"), float(r["lr"]))] = r["val_acc"]
    header = ["head", "labelled", "arm", *(["p"] if tuned_p else [])]
    header += [f"LR {lr:g}" for lr in lrs]
    table = []
    for (head, labels, arm), scores in sorted(groups.items(), key=lambda kv: _group_key(kv[0])):
        best = max(scores, key=lambda k: (scores[k], -ps.index(k[0]), -k[1]))
        for p in [q for q in ps if any(k[0] == q for k in scores)]:
            cells = []
            for lr in lrs:
                text = f"{100 * scores[(p, lr)]:.1f}" if (p, lr) in scores else DASH
                cells.append(f"**{text}**" if (p, lr) == best else text)
            shown_p = ([DASH if p is None else f"{p:g}"]) if tuned_p else []
            table.append([head, _amount(labels), arm, *shown_p, *cells])
    return _markdown(header, table)


def _group_key(key: tuple[str, str, str]) -> tuple:
    head, labels, arm = key
    return (_head_key(head), labels, ARMS.index(arm) if arm in ARMS else len(ARMS))


CSV_COLUMNS = [
    "head",
    "labels",
    "fraction",
    "n_scratch",
    "n_pretrained",
    "scratch_mean",
    "scratch_std",
    "pretrained_mean",
    "pretrained_std",
    "difference",
    "std_ratio",
    "p_value",
    "labelled_images",
    "unlabelled_images",
    "visible",
]


def table_csv(cells: list[Cell]) -> str:
    """Every cell of every head, unrounded; undefined statistics are written as nan, unknown
    image counts as empty fields."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in cells:
        values = [c.head, c.labels, c.fraction, len(c.scratch), len(c.pretrained)]
        values += [c.scratch_mean, c.scratch_std, c.pretrained_mean, c.pretrained_std]
        values += [c.difference, c.std_ratio, c.p_value]
        values += [c.labelled_images, c.unlabelled_images, " ".join(f"{p:g}" for p in c.visible)]
        writer.writerow([repr(v) if isinstance(v, float) else v for v in values])
    return out.getvalue()


def table2_markdown(cells: list[Cell]) -> str:
    """Table 2: both heads pretrained, for each labelled amount run with both."""
    by_head = {h: {c.labels: c for c in cells if c.head == h and c.pretrained} for h in HEAD_ORDER}
    shared = [c for c in by_head["resnet50"].values() if c.labels in by_head["attention"]]
    header = ["labelled", f"{HEAD_NAMES['resnet50']} (pretrained)"]
    header += [f"{HEAD_NAMES['attention']} (pretrained)", "difference (attention - whole ResNet)"]
    rows = []
    for resnet in shared:
        attention = by_head["attention"][resnet.labels]
        rows.append(
            [
                _labelled(resnet),
                _mean_std(resnet.pretrained_mean, resnet.pretrained_std),
                _mean_std(attention.pretrained_mean, attention.pretrained_std),
                _signed(attention.pretrained_mean - resnet.pretrained_mean),
            ]
        )
    return _markdown(header, rows)


# --- figure ---------------------------------------------------------------------------------


def figure(
    cells: list[Cell], path: Path, head: str = "resnet50", dataset: str | None = None
) -> None:
    """Figure 4: test accuracy (%) against labelled fraction, both arms, ± sample std; with
    a dataset of the paper's, its ResNet-50 numbers as faint dashed lines."""
    mine = [c for c in cells if c.head == head]
    if not mine:
        raise UserError(f"no results for head {head!r} to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    # Nudge the arms apart (multiplicatively, the axis is log) so error bars do not overlap.
    for arm, nudge, marker in (("scratch", 0.97, "o"), ("pretrained", 1.03, "s")):
        points = [c for c in mine if getattr(c, arm)]
        means = [getattr(c, f"{arm}_mean") for c in points]
        stds = [np.nan_to_num(getattr(c, f"{arm}_std")) for c in points]
        xs = [c.fraction * nudge for c in points]
        line = ax.errorbar(xs, means, yerr=stds, marker=marker, capsize=3, label=ARM_NAMES[arm])
        papers = [(c.fraction, paper_cell(dataset, c.fraction)) for c in points]
        refs = [(f, ref[ARMS.index(arm)][0]) for f, ref in papers if ref and head == "resnet50"]
        if refs:
            ax.plot(
                *zip(*refs, strict=True),
                linestyle="--",
                marker=marker,
                fillstyle="none",
                alpha=0.45,
                color=line.lines[0].get_color(),
                label=f"paper (ResNet-50): {ARM_NAMES[arm]}",
            )
    fractions = sorted({c.fraction for c in mine})
    ax.set_xscale("log")
    # A margin beyond the nudged arms: with one fraction the axis would span just the nudge.
    ax.set_xlim(fractions[0] / 1.4, fractions[-1] * 1.4)
    ax.set_xticks(fractions, [_percent(f) for f in fractions])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="labelled fraction of the training set", ylabel="test accuracy (%)")
    ax.set_title(f"{HEAD_NAMES.get(head, head)}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table_md(cells: list[Cell], dataset: str | None, tuning: list[dict]) -> str:
    heads = sorted({c.head for c in cells}, key=_head_key)
    parts = ["# Results\n", "Test accuracy (%), mean ± sample std over seeds; n = runs per arm.\n"]
    for head in heads:
        parts += [f"## Table 1: {HEAD_NAMES.get(head, head)}\n"]
        parts += [table_markdown(cells, head, dataset)]
    if all(h in heads for h in HEAD_ORDER):
        parts += ["## Table 2: pretrained heads compared\n", table2_markdown(cells)]
    if tuning:
        what = "Peak-LR and p" if any("visible" in r for r in tuning) else "Peak-LR"
        parts += [f"## {what} tuning: validation accuracy (%) on the 90/10 split\n"]
        parts += [tuning_markdown(tuning)]
    return "\n".join(parts)


def _dataset_of(folder: Path) -> str | None:
    """The dataset of the experiment in `folder` (from experiment.json), if it says."""
    path = folder / "experiment.json"
    try:
        return str(json.loads(path.read_text())["config"]["data"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_report(results_path: Path, out_dir: Path) -> list[Cell]:
    """results.jsonl (and tuning.jsonl beside it, if any) -> out_dir/{table.md, table.csv,
    figure.png}. The figure shows ResNet-50 when it has results, otherwise the first head
    that does; the paper's numbers are added when out_dir's experiment.json names one of
    its datasets."""
    results_path, out_dir = Path(results_path), Path(out_dir)
    cells = summarize(read_results(results_path))
    tuning_path = results_path.with_name("tuning.jsonl")
    tuning = read_lines(tuning_path) if tuning_path.exists() else []
    dataset = _dataset_of(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(_table_md(cells, dataset, tuning))
    (out_dir / "table.csv").write_text(table_csv(cells))
    figure(cells, out_dir / "figure.png", head=cells[0].head, dataset=dataset)
    return cells
