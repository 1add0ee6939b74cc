"""robot.py safety under inference latency, kortex_api threading/error-callback faithfulness and the command line
(issue #15, "The robot"). Same doubles as test_robot.py (tests/fakes on sys.path only here); a simulated clock
wherever the loop allows it (the deadman is a wall-clock thread: the one real-time test keeps it short)."""
import io
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import robot
from robot import Command, Limits

ROOT = Path(__file__).resolve().parents[1]
FAKES = str(ROOT / "tests" / "fakes")
IP = "192.168.1.10"
TOP = 0.45  # box top (m) for the latency tests: the fake Gen3 starts at Home, z = 0.434
LATENCIES = (0.0, 0.05, 0.09, 0.14)  # s of inference per step at 10 Hz (the measurements)


from test_robot import FakeClock, _drop_vendor_modules, clock  # noqa: E402,F401  (the same doubles' clock)


@pytest.fixture
def hw(monkeypatch, clock):
    """The kortex_api double on sys.path, driven by the fake clock; yields the fake Gen3 at the default IP."""
    _drop_vendor_modules()
    monkeypatch.syspath_prepend(FAKES)
    from kortex_api import _robot
    _robot.ARMS.clear()
    yield _robot.add_arm(IP, clock=clock)
    _drop_vendor_modules()


class SlowUp:
    """Always asks for +2 cm in z (a policy pushing through the box top); each act takes `latency` s of `sleep`
    (simulated or real), optionally cycling through several latencies."""
    def __init__(self, latency, sleep):
        self.latencies, self.sleep, self.n = np.atleast_1d(latency), sleep, 0

    def reset(self):
        pass

    def act(self, obs, instruction):
        self.sleep(float(self.latencies[self.n % len(self.latencies)]))
        self.n += 1
        return np.array([0, 0, 0.02, 0, 0, 0, 1], np.float32)


def names(fake):
    return [name for name, _ in fake.calls]


# ---- the workspace box is a hard limit under inference latency ----

@pytest.mark.parametrize("latency", LATENCIES)
def test_box_holds_with_a_slow_policy(hw, clock, latency, caplog):
    """Fake clock, deadman off: the tool's height after every RPC (between RPCs it moves on a straight line)
    never exceeds the box top; before the fix 50/90/140 ms reached 0.458/0.464/0.479 m with TOP = 0.45."""
    arm = robot.KortexArm(IP, "admin", "admin")
    lim = Limits(box_hi=(0.80, 0.40, TOP))
    with caplog.at_level(logging.WARNING, logger="robot"):
        out = robot.run_episode(arm, {}, SlowUp(latency, clock.sleep), "up", lim, hz=10, max_steps=15, clock=clock,
                                sleep=clock.sleep, deadman_periods=None)
    arm.close()
    z = np.array([p[2] for _, p in hw.trace])
    assert out["reason"] == "step limit" and "workspace" in caplog.text
    assert z.max() <= TOP + 1e-9, f"latency {latency * 1e3:.0f} ms: tool reached z = {z.max():.4f} m > box top {TOP}"
    assert z.max() > TOP - 0.002  # and the policy still got (almost) to the top: the clamp did not freeze it


def test_box_holds_in_real_time_with_jittery_latency_and_the_deadman():
    """Wall clock, SimArm, the deadman on: inference takes 90 and 140 ms in turn, so the hold time guessed from
    one step is wrong for the next; the deadman bound (max_hold) keeps the box (before the fix: z = 0.377 m).
    Tolerance 1 mm: the deadman thread may be scheduled late on a loaded machine (the twist near the face is
    mm/s by then)."""
    sim, peak = robot.SimArm(), [0.0]
    advance = sim._advance

    def tracked(**new):
        advance(**new)
        peak[0] = max(peak[0], float(sim.p[2]))
    sim._advance = tracked  # SimArm starts at z = 0.30
    out = robot.run_episode(sim, {}, SlowUp([0.09, 0.14], time.sleep), "up",
                            Limits(box_hi=(0.80, 0.40, 0.35)), hz=10, max_steps=8, deadman_periods=1.5)
    assert out["reason"] == "step limit"
    assert 0.34 < peak[0] <= 0.35 + 1e-3, f"tool reached z = {peak[0]:.4f} m, box top 0.35 m"


def test_twist_is_spread_over_the_hold_time_and_kept_in_the_box_for_max_hold():
    lim = Limits(box_hi=(0.80, 0.40, 0.45), speed_m=10)
    pose = np.array([0.5, 0, 0.30, 0, 0, 0])
    cmd = robot.safe_command([0, 0, 0.02, 0, 0, 0, 1], pose, 0.14, lim)  # held 140 ms: same 2 cm, slower
    assert cmd.linear[2] * 0.14 == pytest.approx(0.02)
    near = np.array([0.5, 0, 0.44, 0, 0, 0])  # 1 cm below the top; the deadman may let the twist run 150 ms
    cmd = robot.safe_command([0, 0, 0.02, 0, 0, 0, 1], near, 0.1, lim, max_hold=0.15)
    assert 0.44 + cmd.linear[2] * 0.15 == pytest.approx(0.45) and any("workspace" in n for n in cmd.notes)


# ---- error callback ----

def test_double_error_callback_has_the_real_signature(hw):
    from kortex_api.RouterClient import RouterClient
    from kortex_api.TCPTransport import TCPTransport
    with pytest.raises(TypeError):  # an instance method: unbound, errorCallback(exception) lacks an argument
        RouterClient.basicErrorCallback(RuntimeError("frame"))
    transport = TCPTransport()
    RouterClient(transport, RouterClient.basicErrorCallback)  # what robot.py used to pass
    transport.connect(IP, 10000)
    assert isinstance(transport.client_error(), TypeError) and transport.stuck  # receive thread now stuck
    with pytest.raises(TimeoutError, match="stuck"):
        transport.send("Stop")


def test_client_error_is_logged_and_stops_the_arm(hw, clock, caplog):
    arm = robot.KortexArm(IP, "admin", "admin")
    policy = SlowUp(0.0, clock.sleep)
    tcp = arm.links[0][0]

    def garbled_frame_after_2():  # the receive thread gets a frame it cannot decode
        if policy.n == 2:
            assert tcp.client_error("Couldn't decode message frame") is None  # our callback does not raise
        return False
    with caplog.at_level(logging.ERROR, logger="robot"):
        out = robot.run_episode(arm, {}, policy, "up", Limits(), hz=10, max_steps=5, clock=clock, sleep=clock.sleep,
                                deadman_periods=None, should_stop=garbled_frame_after_2)
    assert out["reason"].startswith("fault: kortex_api client error") and "decode" in out["reason"]
    assert "kortex_api client error" in caplog.text and len(arm.client_errors) == 1 and not tcp.stuck
    assert names(hw)[-1] == "Stop" and not hw.v.any()  # Stop() still got through
    arm.close()


# ---- two threads on one BaseClient ----

def test_deadman_stop_and_loop_commands_never_overlap_on_the_transport(hw):
    arm = robot.KortexArm(IP, "admin", "admin")
    tcp = arm.links[0][0]
    tcp.wire_s = 0.002  # real time inside send: two unserialized threads would overlap

    def hammer(call, n=30):
        return threading.Thread(target=lambda: [call() for _ in range(n)])
    cmd = Command(np.array([0.01, 0, 0]), np.zeros(3), 0.0, [])
    # the detector works: calling the BaseClient from two threads without robot.py's lock overlaps
    raw = [hammer(lambda: arm.base.SendTwistCommand(_twist(arm))), hammer(arm.base.Stop)]
    [t.start() for t in raw]
    [t.join() for t in raw]
    assert hw.overlaps, "the double failed to detect overlapping sends"
    hw.overlaps.clear()
    tcp.overlaps.clear()
    threads = [hammer(lambda: arm.send(cmd)), hammer(arm.stop), hammer(lambda: arm.gripper(1.0))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert hw.overlaps == [], f"{len(hw.overlaps)} BaseClient calls overlapped another thread's: {hw.overlaps[:5]}"
    arm.close()


def _twist(arm):
    tw = arm.pb.TwistCommand()
    tw.reference_frame = arm.pb.CARTESIAN_REFERENCE_FRAME_BASE
    tw.twist.linear_x = 0.01
    return tw


# ---- command line ----

def test_dry_run_with_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    path = tmp_path / "demos.h5"
    with pytest.raises(SystemExit, match="--dry-run with --record.*all-zero pose change"):
        robot.main(["--backend", "sim", "--dry-run", "--record", str(path), "--instruction", "wave",
                    "--max-steps", "2", "--hz", "50"])
    assert not path.exists()


def _run_trained_on(tmp_path, hz, key="kinova"):
    """A run directory as train.py leaves it, as far as the rate goes: train_args.json naming its --data file."""
    import json

    import data
    demo = tmp_path / f"{key}.h5"
    with data.EpisodeWriter(demo, {"control_hz": hz, "action_convention": robot.ACTION_CONVENTION,
                                   "dataset_key": key}) as w:
        w.add_episode({"static": np.zeros((2, 8, 8, 3), np.uint8)}, np.zeros((2, 7), np.float32), "wave", "wave")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_args.json").write_text(json.dumps({"data": [str(demo)], "steps": 10}))
    return run, demo


def test_hz_other_than_the_training_data_rate_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    run, demo = _run_trained_on(tmp_path, 15)
    assert robot.recorded_control_hz(str(run)) == (15.0, str(demo))
    assert robot.recorded_control_hz(str(run), "other")[0] is None
    with pytest.raises(SystemExit, match=r"--hz 10 .*control_hz=15 .*kinova\.h5.*Run with --hz 15"):
        robot.main(["--backend", "sim", "--ckpt", str(run), "--instruction", "wave", "--hz", "10"])
    assert robot.check_hz(15, str(run)) == 15 and robot.check_hz(None, str(run)) == 15  # default: the data's rate
    with pytest.raises(SystemExit, match="--hz must be a positive"):
        robot.main(["--backend", "sim", "--ckpt", str(run), "--instruction", "wave", "--hz", "0"])


def test_hz_check_says_when_it_cannot_tell(tmp_path, caplog):
    run, demo = _run_trained_on(tmp_path, 15)
    demo.unlink()  # the training data moved away
    with caplog.at_level(logging.WARNING, logger="robot"):
        robot.check_hz(10, str(run))
    assert "cannot check --hz 10" in caplog.text and "kinova.h5" in caplog.text
    assert robot.check_hz(None, str(run)) == 10.0  # unknown: the documented default
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robot"):
        robot.check_hz(10, str(tmp_path))  # not a train.py run directory
    assert "train_args.json" in caplog.text


def test_safety_stop_exits_non_zero_and_skips_the_remaining_episodes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    path = tmp_path / "demos.h5"  # SimArm starts at x = 0.5: outside this box -> a safety stop at once
    with caplog.at_level(logging.INFO, logger="robot"):
        rc = robot.main(["--backend", "sim", "--record", str(path), "--instruction", "wave", "--hz", "50",
                         "--max-steps", "2", "--episodes", "2", "--workspace", "0.6", "0.8", "-0.4", "0.4", "0.02",
                         "0.6"])
    assert rc == robot.EXIT_SAFETY_STOP != 0
    assert "SAFETY STOP (episode 1: fault: tool at" in caplog.text and "episode 2/2" not in caplog.text
