"""Report: statistics against hand-computed values, tables, figure, the whole report."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import pytest
from scipy import stats

from selfie.errors import UserError
from selfie.report import (
    Cell,
    figure,
    read_results,
    summarize,
    table2_markdown,
    table_csv,
    table_markdown,
    tuning_markdown,
    write_report,
)

SCRATCH = [79.0, 80.0, 81.0]  # mean 80.0, sample variance (1 + 0 + 1) / 2 = 1.0
PRETRAINED = [80.0, 80.5, 81.0]  # mean 80.5, sample variance (0.25 + 0 + 0.25) / 2 = 0.25


def rows_for(
    head: str, labels: str, fraction: float, scratch: list[float], pretrained: list[float]
) -> list[dict]:
    """Result rows as finetuning writes them: accuracies as fractions in [0, 1]."""
    rows = []
    for arm, accs in (("scratch", scratch), ("pretrained", pretrained)):
        for seed, acc in enumerate(accs):
            row = {"head": head, "labels": labels, "fraction": fraction, "arm": arm}
            rows.append(row | {"seed": seed, "test_acc": acc / 100, "lr": 0.1})
    return rows


def sample_rows() -> list[dict]:
    rows = rows_for("attention", "frac0.08", 0.08, [70.0, 72.0], [75.0, 76.0])
    rows += rows_for("resnet50", "frac1", 1.0, [95.0, 95.4], [95.6, 95.8])
    rows += rows_for("resnet50", "frac0.08", 0.08, SCRATCH, PRETRAINED)
    rows += rows_for("resnet50", "frac0.05", 0.05, [75.0, 76.0], [75.5, 76.5])
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cell_statistics_by_hand() -> None:
    cell = Cell("resnet50", "frac0.08", 0.08, SCRATCH, PRETRAINED)
    assert cell.scratch_mean == pytest.approx(80.0)
    assert cell.scratch_std == pytest.approx(1.0)
    assert cell.pretrained_mean == pytest.approx(80.5)
    assert cell.pretrained_std == pytest.approx(0.5)
    assert cell.difference == pytest.approx(0.5)
    assert cell.std_ratio == pytest.approx(2.0)
    # Welch: t = (m2 - m1) / sqrt(s1^2/n1 + s2^2/n2), df by Welch-Satterthwaite.
    var_s, var_p, n = 1.0, 0.25, 3
    se2 = var_s / n + var_p / n  # 1.25 / 3
    t = (80.5 - 80.0) / math.sqrt(se2)  # 0.7746
    df = se2**2 / ((var_s / n) ** 2 / (n - 1) + (var_p / n) ** 2 / (n - 1))
    assert df == pytest.approx(50 / 17)
    p = 2 * stats.t.sf(abs(t), df)
    assert cell.p_value == pytest.approx(p, rel=1e-9)
    assert 0.4 < cell.p_value < 0.6


def test_single_run_has_no_std() -> None:
    cell = summarize(rows_for("resnet50", "frac0.08", 0.08, [80.0], [81.0]))[0]
    assert cell.scratch_mean == pytest.approx(80.0)
    assert math.isnan(cell.scratch_std) and math.isnan(cell.pretrained_std)
    assert math.isnan(cell.std_ratio) and math.isnan(cell.p_value)
    table = table_markdown([cell])
    assert "| 80.0 |" in table and "| 81.0 |" in table and "±" not in table
    assert "1/1" in table


def test_identical_runs_no_warning() -> None:
    """Zero spread in both arms: std ratio and p are undefined (NaN), and computing them
    warns nothing (scipy would warn on 0/0)."""
    cell = Cell("resnet50", "frac1", 1.0, [90.0, 90.0], [91.0, 91.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cell.scratch_std == 0.0
        assert math.isnan(cell.std_ratio) and math.isnan(cell.p_value)
        assert table_markdown([cell]).splitlines()[-1].endswith("| +1.0 | — | — |")


def test_summarize_groups_sorts_and_converts_to_percent() -> None:
    cells = summarize(sample_rows())
    assert [(c.head, c.labels) for c in cells] == [
        ("resnet50", "frac0.05"),
        ("resnet50", "frac0.08"),
        ("resnet50", "frac1"),
        ("attention", "frac0.08"),
    ]
    assert cells[1].scratch == pytest.approx(SCRATCH)


def test_summarize_rerun_seed_replaces() -> None:
    rows = rows_for("resnet50", "frac1", 1.0, [90.0, 91.0], [92.0, 93.0])
    rows.append(rows[0] | {"test_acc": 0.95})  # scratch seed 0 again
    cell = summarize(rows)[0]
    assert sorted(cell.scratch) == pytest.approx([91.0, 95.0])


def test_table_markdown() -> None:
    table = table_markdown(summarize(sample_rows()))
    lines = table.strip().splitlines()
    assert lines[0] == (
        "| labelled | n | supervised (scratch) | Selfie pretrained | difference | std ratio "
        "| Welch p |"
    )
    assert len(lines) == 2 + 3  # header, rule, the three ResNet-50 cells
    row = next(line for line in lines if line.startswith("| 8% "))
    assert "| 3/3 | 80.0 ± 1.0 | 80.5 ± 0.5 | +0.5 | 2.0 |" in row


def test_table_markdown_beside_the_paper() -> None:
    """For CIFAR-10 the whole-ResNet table quotes the paper's cells (SPEC 6) at our
    fractions; the attention head's table does not (the paper's Table 1 is ResNet-50)."""
    cells = summarize(sample_rows())
    lines = table_markdown(cells, dataset="cifar10").strip().splitlines()
    assert lines[0].endswith("| paper: supervised | paper: Selfie |")
    assert next(x for x in lines if x.startswith("| 8% ")).endswith("| 79.3 ± 1.0 | 80.3 ± 0.3 |")
    assert next(x for x in lines if x.startswith("| 100% ")).endswith("| 95.5 ± 0.2 | 95.7 ± 0.1 |")
    assert "paper:" not in table_markdown(cells, head="attention", dataset="cifar10")
    assert "paper:" not in table_markdown(cells, dataset="folder")


def test_tuning_markdown_marks_the_choice() -> None:
    rows = [
        {"head": "resnet50", "labels": "frac0.05", "arm": arm, "lr": lr, "val_acc": acc}
        for arm, lr, acc in [
            ("scratch", 0.1, 0.50),
            ("scratch", 0.05, 0.55),
            ("pretrained", 0.05, 0.60),
            ("pretrained", 0.1, 0.60),  # a tie goes to the smaller LR, as the experiment does
        ]
    ]
    lines = tuning_markdown(rows).strip().splitlines()
    assert lines[0] == "| head | labelled | arm | LR 0.05 | LR 0.1 |"
    assert lines[2] == "| resnet50 | 5% | scratch | **55.0** | 50.0 |"
    assert lines[3] == "| resnet50 | 5% | pretrained | **60.0** | 60.0 |"


def test_table_says_the_images_each_cell_used_and_the_chosen_p() -> None:
    """Rows that record their image counts (and, when p was tuned, the pretrained arm's p)
    give the table a column of unlabelled / labelled images with their ratio, and one of the
    chosen p; a subset file's cell is named after its file. Unknown counts show as "?"."""
    rows = rows_for("resnet50", "frac0.05", 0.05, [70.0, 72.0], [75.0, 76.0])
    rows += rows_for("resnet50", "file-1percent.txt", 0.0128, [40.0, 42.0], [50.0, 51.0])
    for r in rows:
        r["labelled_images"] = 2500 if r["labels"] == "frac0.05" else 640
        r["unlabelled_images"] = 0 if r["arm"] == "scratch" else 50_000
        if r["arm"] == "pretrained":
            r["visible"] = 0.5 if r["labels"] == "frac0.05" else 0.75
    lines = table_markdown(summarize(rows)).strip().splitlines()
    assert lines[0].endswith("| Welch p | images: unlabelled / labelled | p (chosen) |")
    assert lines[2].startswith("| 1percent.txt (1.28%) |")
    assert lines[2].endswith("| 50,000 / 640 (78.1x) | 0.75 |")
    assert lines[3].endswith("| 50,000 / 2,500 (20x) | 0.5 |")
    for r in rows:
        del r["unlabelled_images"]  # e.g. --pretrained weights of unknown origin
        r.pop("visible", None)
    lines = table_markdown(summarize(rows)).strip().splitlines()
    assert lines[0].endswith("| images: unlabelled / labelled |")
    assert lines[3].endswith("| ? / 2,500 |")
    records = list(csv.DictReader(io.StringIO(table_csv(summarize(rows)))))
    assert [r["labelled_images"] for r in records] == ["640", "2500"]
    assert [r["unlabelled_images"] for r in records] == ["", ""]


def test_tuning_markdown_with_p_marks_the_best_pair() -> None:
    """One row per (arm, p) when p was tuned; the best (p, LR) of each arm in bold, a tie to
    the p tuned first, then the smaller LR."""
    rows = [
        {"head": "resnet50", "labels": "3pc", "arm": "pretrained", "lr": lr, "val_acc": acc}
        | {"visible": p}
        for p, lr, acc in [(0.75, 0.1, 0.5), (0.75, 0.2, 0.7), (0.5, 0.1, 0.7), (0.5, 0.2, 0.6)]
    ]
    rows.append({"head": "resnet50", "labels": "3pc", "arm": "scratch", "lr": 0.1, "val_acc": 0.4})
    lines = tuning_markdown(rows).strip().splitlines()
    assert lines[0] == "| head | labelled | arm | p | LR 0.1 | LR 0.2 |"
    assert lines[2] == "| resnet50 | 3/class | scratch | — | **40.0** | — |"
    assert lines[3] == "| resnet50 | 3/class | pretrained | 0.75 | 50.0 | **70.0** |"
    assert lines[4] == "| resnet50 | 3/class | pretrained | 0.5 | 70.0 | 60.0 |"


def test_table_csv_parses_back() -> None:
    cells = summarize(sample_rows())
    records = list(csv.DictReader(io.StringIO(table_csv(cells))))
    assert len(records) == 4
    r = next(r for r in records if r["head"] == "resnet50" and r["labels"] == "frac0.08")
    assert float(r["scratch_std"]) == pytest.approx(1.0)
    assert float(r["std_ratio"]) == pytest.approx(2.0)
    assert int(r["n_pretrained"]) == 3
    assert float(r["p_value"]) == pytest.approx(cells[1].p_value)


def test_table2_markdown() -> None:
    table = table2_markdown(summarize(sample_rows()))
    lines = table.strip().splitlines()
    assert "P + attention pooling" in lines[0]
    assert "difference (attention - whole ResNet)" in lines[0]
    assert len(lines) == 3  # only 8% has both heads
    assert lines[2] == "| 8% | 80.5 ± 0.5 | 75.5 ± 0.7 | -5.0 |"


def test_figure_small_png(tmp_path: Path) -> None:
    path = tmp_path / "figure.png"
    figure(summarize(sample_rows()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 300_000


def test_figure_unknown_head(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results"):
        figure(summarize(sample_rows()), tmp_path / "f.png", head="vit")


def test_write_report(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", sample_rows())
    cells = write_report(results, tmp_path / "report")
    assert len(cells) == 4
    for name in ("table.md", "table.csv", "figure.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    text = (tmp_path / "report" / "table.md").read_text()
    assert "Table 1: whole ResNet" in text and "Table 2" in text
    assert "80.0 ± 1.0" in text
    assert "paper:" not in text and "tuning" not in text  # no experiment.json, no tuning.jsonl


def test_write_report_reads_the_experiment(tmp_path: Path) -> None:
    """Beside experiment.json and tuning.jsonl, the report adds the paper and the tuning."""
    results = write_jsonl(tmp_path / "results.jsonl", sample_rows())
    (tmp_path / "experiment.json").write_text(
        json.dumps({"config": {"data": {"dataset": "cifar10"}}})
    )
    tuning = {"head": "resnet50", "labels": "frac0.08", "arm": "scratch", "lr": 0.1, "val_acc": 0.7}
    write_jsonl(tmp_path / "tuning.jsonl", [tuning])
    write_report(results, tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "| 79.3 ± 1.0 | 80.3 ± 0.3 |" in text
    assert "| resnet50 | 8% | scratch | **70.0** |" in text
    assert (tmp_path / "figure.png").stat().st_size < 300_000


def test_read_results_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results yet"):
        read_results(tmp_path / "results.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no results yet"):
        read_results(tmp_path / "empty.jsonl")


def test_read_results_bad_lines(tmp_path: Path) -> None:
    row = sample_rows()[0]
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2"):
        read_results(tmp_path / "a.jsonl")
    bad = {k: v for k, v in row.items() if k != "test_acc"}
    with pytest.raises(UserError, match="test_acc"):
        read_results(write_jsonl(tmp_path / "b.jsonl", [bad]))
    with pytest.raises(UserError, match="arm"):
        read_results(write_jsonl(tmp_path / "c.jsonl", [row | {"arm": "linear"}]))
