"""--tensorboard: the scalars of metrics.jsonl, as TensorBoard events in the run's tb/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfie.runfolder import RunOptions, resume_command
from tests.helpers import run_cli


def test_tensorboard_events_are_the_metrics(tmp_path: Path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--steps", "4", "--device", "cpu"]
    code, _, err = run_cli([*args, "--out", str(out), "--tensorboard"], capsys)
    assert code == 0, err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for key in ("loss", "pretext_acc", "lr", "knn_acc"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in logged]
        for (_, a), (_, b) in zip(got, logged, strict=True):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b))  # float32 in the event file
    assert resume_command("pretrain", RunOptions(out=out, tensorboard=True)).endswith(
        "--tensorboard"
    )


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--out", str(out), "--tensorboard"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'selfie[tensorboard]'" in err
    assert not out.exists()
