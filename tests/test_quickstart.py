"""`selfie quickstart`: what it runs, prints and writes (on the tiny preset), and a conclusion
that follows the table rather than the hope."""

from __future__ import annotations

import json
from pathlib import Path

from selfie import quickstart as qs
from selfie.config import get_preset
from selfie.report import Cell


def test_quickstart_runs_both_arms_and_says_what_the_table_shows(tmp_path: Path, capsys):
    out = tmp_path / "qs"
    qs.quickstart(out, config=get_preset("tiny"))
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * qs.SEEDS
    assert {r["arm"] for r in rows} == {"pretrained", "scratch"}
    assert {r["labels"] for r in rows} == {f"{qs.LABELS_PER_CLASS}pc"}
    assert f"| {qs.LABELS_PER_CLASS}/class" in printed and "Welch p" in printed
    assert "What this shows:" in printed and "What it does not:" in printed
    assert (out / "figure.png").stat().st_size > 1000
    assert (out / "pretrain" / "pretext.png").exists()


def test_conclusion_claims_a_gain_only_when_the_table_shows_one():
    clear = Cell("resnet50", "5pc", 0.03, [80.0, 81.0, 79.5, 80.5, 80.2], [85.0, 85.5, 84.8, 85.2])
    assert clear.p_value < 0.05
    text = qs.conclusion(clear, 5)
    assert "4.9 points more accurate" in text and "helped" in text
    noise = Cell("resnet50", "5pc", 0.03, [80.0, 83.0, 78.0], [81.0, 79.0, 83.5])
    assert noise.p_value > 0.05
    text = qs.conclusion(noise, 5)
    assert "does not show that pretraining helped" in text and "more accurate" not in text
    worse = Cell("resnet50", "5pc", 0.03, [85.0, 85.5, 84.8], [80.0, 81.0, 79.5])
    assert "does not show" in qs.conclusion(worse, 5)  # significant, but the wrong way
