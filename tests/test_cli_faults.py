"""train.py / evaluate.py as a new user and a hostile tester meet them (issue 15): a machine without OpenGL, bad
numeric flags, a reused --out, Ctrl-C / SIGTERM mid-training, a full disk during a checkpoint. Each case must
end in a clear error that names the flag, limit or file, or lose nothing. Tiny model, tiny synthetic HDF5 data."""

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """4 episodes of 12 random 16 px frames: enough for batches of 8 windows."""
    path = tmp_path_factory.mktemp("toy") / "toy.h5"
    rng = np.random.default_rng(0)
    attrs = {"control_hz": 10, "action_convention": "delta xyz + delta euler xyz + gripper 1 open/-1 closed",
             "dataset_key": "toy"}
    with data.EpisodeWriter(str(path), attrs) as w:
        for e in range(4):
            images = {v: rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8) for v in ("static", "wrist")}
            a = rng.normal(size=(12, 7)).astype(np.float32)
            a[:, 6] = np.where(a[:, 6] > 0, 1.0, -1.0)
            w.add_episode(images, a, f"do task {e % 2}", f"task{e % 2}")
    return str(path)


def flags(data_path, out, steps, *extra):
    return ["--data", data_path, "--out", str(out), "--steps", str(steps), "--image-size", "32", "--batch", "8",
            "--threads", "1", "--loader-workers", "0", "--log-every", "1", "--eval-episodes", "0", *map(str, extra)]


def metric_steps(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# -----------------------------------------------------------------------------------------------------------
# a new machine: no OSMesa
# -----------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_osmesa(tmp_path, monkeypatch):
    """A machine without OSMesa, as the dynamic loader sees it: every name PyOpenGL tries (libOSMesa.so,
    libOSMesa.so.9 .. .0) resolves first to a file that is no library, in a folder on LD_LIBRARY_PATH. The
    rendering check then fails exactly as a fresh Debian box did ('NoneType' object has no attribute
    'glGetError'), without uninstalling anything."""
    shadow = tmp_path / "no_osmesa"
    shadow.mkdir()
    for name in ["libOSMesa.so"] + [f"libOSMesa.so.{i}" for i in range(10)]:
        (shadow / name).write_text("not a shared library")
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{shadow}:{os.environ.get('LD_LIBRARY_PATH', '')}")


def test_rendering_check_names_what_to_install(no_osmesa, tmp_path):
    pytest.importorskip("mujoco")
    with pytest.raises(RuntimeError) as e:
        evaluate.check_rendering()
    msg = str(e.value)
    assert "MUJOCO_GL=osmesa" in msg and "glGetError" in msg  # what failed
    assert "apt-get install libosmesa6" in msg and "MUJOCO_GL=egl" in msg  # what to do
    # train.py stops before any work (no run directory, no demos), evaluate.py before loading the run
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="apt-get install libosmesa6"):
        train.main(["--tasks", "drawer-open", "--demos-per-task", "1", "--steps", "1", "--out", str(out),
                    "--cache-dir", str(tmp_path / "cache")])
    assert not out.exists() and not (tmp_path / "cache").exists()
    with pytest.raises(SystemExit, match="apt-get install libosmesa6"):
        evaluate.main(["--ckpt", str(tmp_path), "--benchmark", "metaworld"])


def test_rendering_check_passes_here_and_data_runs_need_none(tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    assert evaluate.check_rendering() == os.environ["MUJOCO_GL"]  # this machine renders (CI: OSMesa or EGL)
    args = train.parse_args(["--data", "x.h5", "--eval-episodes", "5"])
    assert not train.needs_rendering(args)  # --data runs never render
    args = train.parse_args(["--eval-episodes", "0", "--cache-dir", str(tmp_path)])
    assert train.needs_rendering(args)  # the demonstrations are not cached yet


# -----------------------------------------------------------------------------------------------------------
# command line: numeric flags, a reused --out
# -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["--steps", "-5"], "--steps must be >= 1, got -5"),  # used to exit 0 having trained nothing
    (["--batch", "0"], "--batch must be >= 1, got 0"),  # used to end in ZeroDivisionError
    (["--ckpt-every", "0"], "--ckpt-every must be >= 1, got 0"),  # ditto
    (["--lr", "nan"], "--lr must be >= 0, got nan"),
    (["--data-weights", "1", "-1"], "--data-weights must be > 0, got -1.0"),
    (["--eval-seed", "1000"], "--eval-seed must be in 0..999, got 1000"),
    (["--batch", "6", "--grad-accum", "4"], "--batch 6 (the global batch) must be a multiple of --grad-accum 4"),
])
def test_bad_numeric_flag_is_an_argparse_error(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert f"error: {named}" in capsys.readouterr().err


def test_every_numeric_flag_has_a_range_that_is_enforced(capsys):
    """parse_args asserts that every int/float flag has a FLAG_RANGES entry; here each range refuses the first
    value outside it, and the message names the flag and the range."""
    train.parse_args([])
    for dest, rule in train.FLAG_RANGES.items():
        bad = rule.split("..")[1] if ".." in rule else rule.split()[1]
        bad = int(bad) + 1 if ".." in rule else (int(bad) - 1 if rule.startswith(">=") else int(bad))
        flag = "--" + dest.replace("_", "-")
        with pytest.raises(SystemExit):
            train.parse_args([flag, str(bad)])
        err = capsys.readouterr().err
        assert f"{flag} must be" in err and rule in err and f"got {bad}" in err, (flag, err)


def test_reused_out_is_refused_and_says_how_to_resume(toy, tmp_path):
    out = tmp_path / "run"
    train.main(flags(toy, out, 2, "--ckpt-every", "1"))
    before = (metric_steps(out), sorted(p.name for p in (out / "checkpoints").iterdir()))
    with pytest.raises(SystemExit) as e:
        train.main(flags(toy, out, 3, "--lr", "1e-3"))
    msg = str(e.value)
    assert f"--out {out} already holds a training run" in msg and "step_00000002" in msg
    assert f"python train.py --resume {out}" in msg and f"rm -r {out}" in msg
    assert (metric_steps(out), sorted(p.name for p in (out / "checkpoints").iterdir())) == before  # untouched
    # --resume continues it; a folder holding only train_args.json (a run that failed before its first step,
    # e.g. on a bad --data path) is taken over by the next run
    train.main(["--resume", str(out), "--steps", "3"])
    assert metric_steps(out) == [1, 2, 3]
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "train_args.json").write_text("{}")
    train.check_out_dir(train.parse_args(flags(toy, failed, 1)))


def test_findings_sweep_clears_an_interrupted_run_before_training_it_again(tmp_path):
    """benchmarks/findings.py re-trains a forced or interrupted run in its own directory: it first removes what
    train.py would refuse (checkpoints, weights, metrics), keeping its own log and lock."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import findings
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    for f in ("model.safetensors", "metrics.csv", "train.log", "findings_time.json", "eval_first_seen.log"):
        (run / f).write_text("x")
    (run / "eval_first_seed0_seen").mkdir()  # the old model's evaluation: not the new model's
    args = train.parse_args(["--out", str(run)])
    with pytest.raises(SystemExit, match="already holds a training run"):
        train.check_out_dir(args)
    findings.clear_training(run)
    train.check_out_dir(args)
    assert sorted(p.name for p in run.iterdir()) == ["findings_time.json", "train.log"]


# -----------------------------------------------------------------------------------------------------------
# command line: SIGINT / SIGTERM during training
# -----------------------------------------------------------------------------------------------------------

def start(argv, new_group=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py")] + argv, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_group)


def wait_for_rows(p, run_dir, n, timeout=240):
    """Until metrics.csv has n rows (training is under way); fails if the process ends first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            raise AssertionError(f"train.py ended early ({p.returncode}):\n{p.communicate()[1][-3000:]}")
        f = Path(run_dir) / "metrics.csv"
        if f.is_file() and len(f.read_text().split()) > n:
            return
        time.sleep(0.05)
    p.kill()
    raise AssertionError("training did not start")


def test_sigint_finishes_the_step_checkpoints_and_resumes_without_duplicate_rows(toy, tmp_path, capsys):
    """Ctrl-C mid-run (no checkpoint due for 1000 steps): the step finishes, a checkpoint of it is written, the
    exit code is 130 and the resume command is printed; resuming continues from that step, and metrics.csv
    holds each step once."""
    out = tmp_path / "run"
    p = start(flags(toy, out, 10_000, "--ckpt-every", "1000"))
    wait_for_rows(p, out, 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, err[-3000:]
    step = metric_steps(out)[-1]
    assert step >= 3 and metric_steps(out) == list(range(1, step + 1))
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert f"stopped by SIGINT after step {step} of 10000; checkpoint {ckpt}" in err
    assert f"Continue with: python train.py --resume {out}" in err
    assert train.verify_checkpoint(ckpt) is None and not list((out / "checkpoints").glob(".tmp*"))
    train.main(["--resume", str(out), "--steps", str(step + 2)])
    assert f"resumed from {ckpt} at step {step}" in capsys.readouterr().out
    assert metric_steps(out) == list(range(1, step + 3))  # no step twice


def test_sigterm_to_the_process_group_with_loader_workers(toy, tmp_path):
    """A scheduler's SIGTERM reaches every process of the job, DataLoader workers included: the main process
    still finishes the step and checkpoints (workers leave the stop to it), and exits 143."""
    out = tmp_path / "run"
    argv = flags(toy, out, 10_000, "--ckpt-every", "1000")
    argv[argv.index("--loader-workers") + 1] = "1"
    p = start(argv, new_group=True)
    wait_for_rows(p, out, 2)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = metric_steps(out)[-1]
    assert f"stopped by SIGTERM after step {step}" in err and "DataLoader worker" not in err
    assert train.verify_checkpoint(out / "checkpoints" / f"step_{step:08d}") is None


def worker_pid(launcher_pid, rank):
    """The torchrun worker process of `rank` (a child of the launcher, found through /proc)."""
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0") if ppid == launcher_pid else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    raise AssertionError(f"no rank {rank} worker under pid {launcher_pid}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the torchrun workers through /proc")
def test_sigterm_to_one_torchrun_rank_stops_every_rank_after_the_same_step(toy, tmp_path):
    """torchrun, 2 processes, SIGTERM to rank 1 only: the ranks agree (in the all-reduce every step already
    makes) to stop after the same step, write one checkpoint with both ranks' RNG state, and exit; no rank is
    left waiting in a collective. Rank 0 prints the torchrun resume command."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29700 + os.getpid() % 1000), str(ROOT / "train.py"),
                          *flags(toy, out, 10_000, "--ckpt-every", "1000")],
                         cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_rows(p, out, 2)
    os.kill(worker_pid(p.pid, 1), signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode != 0
    step = metric_steps(out)[-1]
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert f"stopped by a signal to another rank after step {step} of 10000; checkpoint {ckpt}" in err, err[-3000:]
    assert f"Continue with: torchrun --nproc_per_node=2 train.py --resume {out}" in err
    assert train.verify_checkpoint(ckpt) is None
    assert {f.name for f in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}


def test_resume_without_a_checkpoint_drops_the_old_rows(toy, tmp_path):
    """A run that died before its first checkpoint (SIGKILL, power cut: no handler runs) has metrics rows but no
    checkpoint: the resume starts at step 0 again, and metrics.csv must not keep the first attempt's rows too."""
    out = tmp_path / "run"
    train.main(flags(toy, out, 3, "--ckpt-every", "100"))
    import shutil
    shutil.rmtree(out / "checkpoints")  # what a crash before step 100 leaves: rows 1..3, no checkpoint
    assert metric_steps(out) == [1, 2, 3]
    with pytest.warns(UserWarning, match="no checkpoint found"):
        train.main(["--resume", str(out), "--steps", "5"])
    assert metric_steps(out) == [1, 2, 3, 4, 5]


# -----------------------------------------------------------------------------------------------------------
# command line: a full disk during a checkpoint
# -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["ENOSPC", "torch", "safetensors"])
def test_full_disk_during_checkpoint_keeps_the_last_good_one(toy, tmp_path, monkeypatch, failure):
    """Checkpoint step 4 fails half-way, as on a full disk: train_state.pt with OSError(ENOSPC), or as torch.save
    reports it (RuntimeError from inline_container.cc, with no errno; the free space tells); or model.safetensors
    as safetensors reports it (SafetensorError, what a 26 MiB tmpfs gave). The partial directory is removed, the
    message says "no space left" and where, and step 2 stays the run's newest checkpoint (and top-level weights)."""
    import safetensors
    import safetensors.torch
    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def save_file(tensors, path, *a, **k):
        if failure == "safetensors" and ".tmp_step_00000004" in str(path):
            Path(path).write_bytes(b"\0" * 4096)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        return real_save_file(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def save(obj, f, *a, **k):
        if Path(f).name == "train_state.pt" and obj.get("step") == 4 and failure != "safetensors":
            Path(f).write_bytes(b"\0" * 4096)  # the part that made it to disk
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    if failure == "torch":
        real_usage = train.shutil.disk_usage
        monkeypatch.setattr(train.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1024))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(flags(toy, out, 6, "--ckpt-every", "2"))
    msg, ck = str(e.value), out / "checkpoints"
    assert f"no space left on the device of {ck} while writing checkpoint step 4" in msg
    assert f"Removed the partial .tmp_step_00000004; the last good checkpoint is {ck / 'step_00000002'}" in msg
    assert f"python train.py --resume {out}" in msg
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]  # no .tmp_step_* left filling the disk
    assert train.verify_checkpoint(ck / "step_00000002") is None
    assert not [f for f in out.iterdir() if ".tmp" in f.name]
    import json
    assert json.loads((out / "config.json").read_text())["extra"]["step"] == 2
