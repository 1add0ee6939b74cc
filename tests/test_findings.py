"""benchmarks/findings.py: the sweep's bookkeeping (result files, statistics, verdicts, the regenerated page,
locks, commands), without training anything."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import findings  # noqa: E402


def fake_result(folder, run, seed, execution, condition, per_task, episodes=10):
    r = dict(run=run, seed=seed, execution=execution, condition=condition, episodes=episodes, eval_seed=0,
             success=dict(zip(("a", "b"), per_task)), expert={}, train_flags=[], steps=3500, train_seconds=600.0,
             eval_seconds=60.0, hardware="test cpu", commit="abc", date="2026-12-06", train_command="",
             eval_command="")
    (folder / f"{run}__seed{seed}__{execution}__{condition}.json").write_text(json.dumps(r))


def test_wilson_interval_matches_the_closed_form():
    lo, hi = findings.wilson(45, 50)
    assert abs(lo - 0.7864) < 1e-3 and abs(hi - 0.9565) < 1e-3  # 0.9 with n = 50, z = 1.96
    assert findings.wilson(0, 10)[0] == 0.0 and findings.wilson(10, 10)[1] == 1.0


def test_verdicts():
    hi = dict(lo=0.8, hi=0.95)
    lo = dict(lo=0.3, hi=0.5)
    mid = dict(lo=0.45, hi=0.85)
    assert findings.verdict(hi, lo, "beats") == "reproduced"
    assert findings.verdict(lo, hi, "beats").startswith("not reproduced")
    assert findings.verdict(hi, mid, "beats").startswith("inconclusive")
    assert findings.verdict(hi, mid, "matches").startswith("consistent")
    assert findings.verdict(hi, lo, "matches").startswith("not reproduced")
    assert findings.verdict(None, lo, "beats") == "not run yet"
    one, three = dict(per_seed=[0.9]), dict(per_seed=[0.9, 0.8, 1.0])
    assert findings.seeds_caveat(one, three) == " (1 vs 3 seeds)" and findings.seeds_caveat(three, three) == ""
    s1 = findings.summarize({0: dict(episodes=10, success={"a": 0.7, "b": 0.9})})
    assert "±" not in findings.cell(s1) and findings.cell(s1).startswith("80.0% [")  # no spread from one seed
    labels = {t: {v.label for v in spec["variants"]} for t, spec in findings.TABLES.items()}
    for f in findings.FINDINGS:  # every finding names two variants of its table
        assert {f.a, f.b} <= labels[f.table], f


def test_report_regenerates_the_page_from_result_files_alone(tmp_path, monkeypatch):
    res = tmp_path / "runs"
    res.mkdir()
    for seed, (pd, ph) in enumerate([((0.4, 0.6), (1.0, 0.9)), ((0.5, 0.5), (0.9, 1.0)), ((0.3, 0.5), (1.0, 1.0))]):
        fake_result(res, "one_step_discrete", seed, "first", "seen", pd)
        fake_result(res, "policy_head", seed, "first", "seen", ph)
        fake_result(res, "policy_head", seed, "first", "shifted", (0.2, 0.4))
    doc = tmp_path / "findings.md"
    doc.write_text(f"# prose before\n{findings.MARK_BEGIN}\nold tables\n{findings.MARK_END}\nprose after\n")
    monkeypatch.setattr(findings, "ROOT", tmp_path)
    findings.main(["--report", "--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# prose before\n") and text.rstrip().endswith("prose after")
    assert "old tables" not in text
    # policy head, seen: per-seed 0.95, 0.95, 1.0 -> mean 96.7%, 58 of 60 episodes
    lo, hi = findings.wilson(58, 60)
    assert f"96.7% ± 2.9 [{100 * lo:.0f}, {100 * hi:.0f}] (3s)" in text
    assert "| One-Step Disc. | first | 46.7% ± 5.8" in text
    assert "| Interleaved Cont. | first | – | – | – |" in text
    assert "from 9 result files" in text and "3.0 h of training" not in text  # trainings count once per run
    assert "1.0 h of training" in text  # 2 runs x 3 seeds x 600 s
    assert (tmp_path / "docs" / "findings" / "formulations.png").exists()


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
    # interleaved + policy head, 3 demos each: train + evaluate on seen, shifted and paraphrased
    assert len(cmds) == len(set(cmds)) == 8
    assert all("--demos-per-task 3" in c for c in cmds if "train.py" in c)
    assert all("--steps 7" in c for c in cmds if "train.py" in c)
    assert sum("--scene shifted" in c for c in cmds) == 2 and sum("--instructions paraphrased" in c for c in cmds) == 2


def test_default_budget_is_train_pys_own(capsys):
    findings.PRINTED.clear()
    findings.main(["--table", "formulations", "--seeds", "0", "--only", "Policy", "--dry-run"])
    cmds = [line for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert cmds and all("--steps" not in c for c in cmds)
    assert findings.parse_args([]).episodes == 10


def test_bad_flags_are_refused():
    for argv in (["--seeds", ""], ["--conditions", "dark"], ["--episodes", "0"]):
        with pytest.raises(SystemExit):
            findings.parse_args(argv)


def test_a_run_trained_with_other_settings_is_trained_again(tmp_path):
    """A checkpoint left under runs/findings by an older train.py default (or other --train-args) is not the
    model today's command trains: stale_training names the difference, so run_variant retrains instead of
    evaluating the old model under the new row."""
    import train
    cmd = [sys.executable, "train.py", "--formulation", "policy_head", "--seed", "1", "--out", str(tmp_path),
           "--workers", "1", "--threads", "1"]
    assert findings.stale_training(tmp_path, cmd) == ""  # nothing trained yet
    same = json.loads(json.dumps(vars(train.parse_args(cmd[2:]))))
    same.update(out="elsewhere", workers=0, threads=2, cache_dir="/tmp/cache")  # where it ran: the same model
    (tmp_path / "train_args.json").write_text(json.dumps(same))
    assert findings.stale_training(tmp_path, cmd) == ""
    older = dict(same, shift_aug=not same["shift_aug"], steps=3500)  # e.g. trained before a default changed
    (tmp_path / "train_args.json").write_text(json.dumps(older))
    stale = findings.stale_training(tmp_path, cmd)
    assert f"shift_aug: {older['shift_aug']} -> {same['shift_aug']}" in stale and "steps: 3500 -> " in stale
