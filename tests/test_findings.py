"""benchmarks/findings.py: the sweep's bookkeeping (tables, locks, commands), without training anything."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import findings  # noqa: E402


def test_markdown_reports_mean_std_and_every_seed():
    args = findings.parse_args(["--seeds", "0,1,2"])
    spec = findings.TABLES["formulations"]
    rows = [(spec["variants"][0], [0.4, 0.6, 0.5]), (spec["variants"][3], [1.0, 0.8, 0.9])]
    text = findings.markdown(args, spec, rows, 600.0)
    assert "| One-Step Disc. | first | 50.0% ± 10.0 | 40%, 60%, 50% | 0.424 / 0.55 |" in text
    assert "| Policy-Head Cont. | first | 90.0% ± 10.0 | 100%, 80%, 90% |" in text
    assert "10.0 min" in text


def test_bar_chart_is_written(tmp_path):
    spec = findings.TABLES["moe"]
    findings.bar_chart(spec["title"], [(v, [0.5, 0.7]) for v in spec["variants"]], tmp_path / "moe.png")
    from PIL import Image
    assert Image.open(tmp_path / "moe.png").size[0] == 900


def test_run_lock_is_released_and_taken_over_from_a_dead_holder(tmp_path):
    run = tmp_path / "run"
    with findings.run_lock(run):
        assert (run / "findings.lock").read_text() == str(os.getpid())
    assert not (run / "findings.lock").exists()
    (run / "findings.lock").write_text("999999999")  # a holder that no longer exists
    with findings.run_lock(run):
        assert (run / "findings.lock").read_text() == str(os.getpid())
    assert not (run / "findings.lock").exists()


def test_dry_run_prints_each_command_once(capsys):
    findings.PRINTED.clear()
    findings.main(["--table", "data", "--seeds", "0", "--only", "0.1x", "--dry-run", "--steps", "7"])
    out = capsys.readouterr().out.splitlines()
    cmds = [line for line in out if line.strip().startswith("$")]
    assert len(cmds) == len(set(cmds)) == 4  # interleaved + policy head, 3 demos each: train + evaluate
    assert all("--demos-per-task 3" in c for c in cmds if "train.py" in c)
    assert all("--steps 7" in c for c in cmds if "train.py" in c)


def test_seeds_are_required():
    with pytest.raises(SystemExit):
        findings.parse_args(["--seeds", ""])
