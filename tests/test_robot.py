"""robot.py against test doubles of kortex_api, pyrealsense2 and pyk4a (tests/fakes, put on sys.path only here)
and a fake clock, so every test is deterministic and needs no hardware."""
import io
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import robot
from robot import Command, Fault, Limits, safe_command

ROOT = Path(__file__).resolve().parents[1]
FAKES = str(ROOT / "tests" / "fakes")
VENDOR = ("kortex_api", "pyrealsense2", "pyk4a")
IP = "192.168.1.10"


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def sleep(self, dt):
        assert dt >= 0
        self.t += dt


def _drop_vendor_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in VENDOR:
            del sys.modules[name]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def hw(monkeypatch, clock):
    """The vendor doubles on sys.path, driven by the fake clock; yields the fake Gen3 at the default IP."""
    _drop_vendor_modules()
    monkeypatch.syspath_prepend(FAKES)
    import pyk4a
    import pyrealsense2
    from kortex_api import _robot
    for mod in (pyrealsense2, pyk4a):
        monkeypatch.setattr(mod, "clock", clock)
        monkeypatch.setattr(mod, "sleep", clock.sleep)
    _robot.ARMS.clear()
    yield _robot.add_arm(IP, clock=clock)
    _drop_vendor_modules()


class ConstPolicy:
    def __init__(self, action, fail_at=None, exc=RuntimeError):
        self.action, self.fail_at, self.exc = np.asarray(action, np.float32), fail_at, exc
        self.seen, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def act(self, obs, instruction):
        if len(self.seen) == self.fail_at:
            raise self.exc("policy crashed")
        self.seen.append({k: (v.shape, v.dtype) for k, v in obs.items()})
        return self.action.copy()


def twists(fake):
    return [m for name, m in fake.calls if name == "SendTwistCommand"]


def names(fake):
    return [name for name, _ in fake.calls]


def episode(arm, cams, policy, clock, limits=None, **kw):
    kw.setdefault("hz", 10)
    kw.setdefault("max_steps", 5)
    kw.setdefault("deadman_periods", None)  # a wall-clock thread: off under the fake clock
    return robot.run_episode(arm, cams, policy, "pick up the block", limits or Limits(), clock=clock,
                             sleep=clock.sleep, **kw)


# ---- install story ----

def test_help_works_without_vendor_packages():
    block = "import runpy, sys; sys.modules.update(kortex_api=None, pyrealsense2=None, pyk4a=None); " \
            "sys.argv = ['robot.py', '--help']; runpy.run_path('robot.py', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--dry-run" in r.stdout and "KINOVA_PASSWORD" in r.stdout


def test_missing_vendor_package_says_how_to_install(monkeypatch):
    for name in VENDOR:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail, installed or not
    with pytest.raises(ImportError, match="not on PyPI.*--backend sim"):
        robot.KortexArm(IP, "admin", "admin")
    with pytest.raises(ImportError, match="pip install pyrealsense2"):
        robot.RealSenseCamera()
    with pytest.raises(ImportError, match="Azure Kinect SDK"):
        robot.AzureKinectCamera()


def test_credentials_default_and_come_from_env_or_flags(monkeypatch):
    a = robot.build_parser().parse_args(["--instruction", "x"])
    assert (a.ip, a.username, a.password) == ("192.168.1.10", "admin", "admin")
    monkeypatch.setenv("KINOVA_IP", "10.0.0.7")
    monkeypatch.setenv("KINOVA_PASSWORD", "s3cret")
    a = robot.build_parser().parse_args(["--instruction", "x", "--username", "op"])
    assert (a.ip, a.username, a.password) == ("10.0.0.7", "op", "s3cret")


# ---- rotations and the action convention ----

def test_rotation_math_matches_scipy():
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(0)
    for e in rng.uniform([-np.pi, -1.5, -np.pi], [np.pi, 1.5, np.pi], size=(50, 3)):
        R = robot.euler_xyz_to_matrix(e)
        np.testing.assert_allclose(R, Rotation.from_euler("xyz", e).as_matrix(), atol=1e-12)
        np.testing.assert_allclose(robot.matrix_to_euler_xyz(R), e, atol=1e-9)
        np.testing.assert_allclose(robot.matrix_to_rotvec(R), Rotation.from_matrix(R).as_rotvec(), atol=1e-9)
    for rv in ([1e-9, 0, 0], [0, 0, np.pi - 1e-6], [np.pi / np.sqrt(2), -np.pi / np.sqrt(2), 0], [0.3, -0.2, 0.1]):
        R = Rotation.from_rotvec(rv).as_matrix()
        got = robot.matrix_to_rotvec(R)
        np.testing.assert_allclose(Rotation.from_rotvec(got).as_matrix(), R, atol=1e-6)


def test_pose_delta_is_a_base_frame_step():
    p0 = np.array([0.5, 0.1, 0.3, np.pi, 0.1, 0.5])
    a = np.array([0.01, -0.02, 0.005, 0.05, -0.03, 0.1])
    R1 = robot.euler_xyz_to_matrix(a[3:]) @ robot.euler_xyz_to_matrix(p0[3:])
    p1 = np.concatenate([p0[:3] + a[:3], robot.matrix_to_euler_xyz(R1)])
    np.testing.assert_allclose(robot.pose_delta(p0, p1), a, atol=1e-12)


# ---- kortex_api: sessions, units, gripper, stop, faults ----

def test_kortex_sessions_units_gripper_and_close(hw, clock):
    arm = robot.KortexArm(IP, "admin", "admin")
    assert hw.sessions == 2  # TCP (BaseClient) + UDP (BaseCyclicClient)
    s = arm.state()
    np.testing.assert_allclose(s.pose, [0.576, 0.0015, 0.434, np.pi / 2, 0, np.pi / 2], atol=1e-9)  # deg -> rad
    assert s.gripper == 0.0 and s.fault == ""
    arm.send(Command(np.array([0.1, 0.0, -0.05]), np.array([0.0, 0.0, np.radians(10)]), 0.0, []))
    tw = twists(hw)[-1]
    assert tw.reference_frame == 3 and tw.duration == 0  # CARTESIAN_REFERENCE_FRAME_BASE
    assert (tw.twist.linear_x, tw.twist.linear_z) == (pytest.approx(0.1), pytest.approx(-0.05))
    assert tw.twist.angular_z == pytest.approx(10.0)  # deg/s on the wire
    clock.sleep(1.0)  # the twist persists until the next command or Stop
    s = arm.state()
    np.testing.assert_allclose(s.pose, [0.676, 0.0015, 0.384, np.pi / 2, 0, np.pi / 2 + np.radians(10)], atol=1e-9)
    arm.gripper(1.0)
    g = [m for n, m in hw.calls if n == "SendGripperCommand"][-1]
    assert g.mode == 3 and g.gripper.finger[0].finger_identifier == 1 and g.gripper.finger[0].value == 1.0
    clock.sleep(1.0)
    assert arm.state().gripper == pytest.approx(1.0)  # feedback 100 % -> closedness 1
    arm.close()
    assert names(hw)[-1] == "Stop" and hw.sessions == 0 and not hw.v.any()


def test_kortex_bad_credentials_and_missing_gripper(hw, clock):
    with pytest.raises(ConnectionError, match="KINOVA_PASSWORD"):
        robot.KortexArm(IP, "admin", "wrong")
    assert hw.sessions == 0
    from kortex_api import _robot
    _robot.add_arm("10.0.0.2", clock=clock, has_gripper=False)
    arm = robot.KortexArm("10.0.0.2", "admin", "admin")
    with pytest.raises(Fault, match="Robotiq"):
        arm.state()
    arm.close()


def test_kortex_double_enforces_what_the_controller_enforces(hw, clock):
    from kortex_api.autogen.messages import Base_pb2
    hw.servoing = Base_pb2.LOW_LEVEL_SERVOING  # left over from another program: twists would be refused
    arm = robot.KortexArm(IP, "admin", "admin")
    assert hw.servoing == Base_pb2.SINGLE_LEVEL_SERVOING  # robot.py switches to high-level servoing
    arm.send(Command(np.array([2.0, 0, 0]), np.zeros(3), 0.0, []))  # bypassing safe_command on purpose
    clock.sleep(1.0)
    assert arm.state().pose[0] == pytest.approx(0.576 + 0.5)  # clamped by the 0.5 m/s hard limit
    with pytest.raises(TypeError):
        Base_pb2.GripperCommand().mode = 3.0  # protobuf int fields refuse floats
    with pytest.raises(AttributeError):
        Base_pb2.TwistCommand().frame = 3  # and unknown fields
    arm.close()


def test_kortex_fault_stops_the_episode(hw, clock):
    arm = robot.KortexArm(IP, "admin", "admin")
    policy = ConstPolicy([0.01, 0, 0, 0, 0, 0, 1])

    def estop_after_2():  # the arm faults (e-stop button, protection zone) between two steps
        if len(policy.seen) == 2:
            arm.base.ApplyEmergencyStop()
        return False
    out = episode(arm, {}, policy, clock, should_stop=estop_after_2)
    assert out["reason"].startswith("fault: arm in fault") and len(policy.seen) == 2
    assert names(hw)[-1] == "Stop"
    arm.close()


# ---- cameras ----

def test_realsense_and_kinect_give_rgb_uint8_with_timestamps(hw, clock):
    rs_cam, k4a_cam = robot.RealSenseCamera(), robot.AzureKinectCamera()
    (a, ta), (b, tb) = rs_cam.read(), rs_cam.read()
    assert a.shape == (480, 640, 3) and a.dtype == np.uint8 and a.flags.owndata
    assert a[0, 0, 0] != b[0, 0, 0] and a[0, 0, 2] == 0  # RGB order: the double varies red, never blue
    assert tb - ta == pytest.approx(1 / 30)
    (c, tc), (d, td) = k4a_cam.read(), k4a_cam.read()
    assert c.shape == (720, 1280, 3) and c.dtype == np.uint8
    assert c[-1, 0, 0] == 180 and c[0, 0, 0] == 0  # BGRA -> RGB: lower half red
    assert c[0, 0, 2] != d[0, 0, 2] and td - tc == pytest.approx(1 / 30, abs=1e-6)  # integer usec
    rs_cam.close()
    k4a_cam.close()


# ---- safety rules ----

def test_workspace_box_clamps_and_logs(hw, clock, caplog):
    lim = Limits(box_hi=(0.80, 0.40, 0.45))
    cmd = safe_command([0.0, 0.0, 0.03, 0, 0, 0, 1], np.array([0.5, 0, 0.44, 0, 0, 0]), 0.1, lim)
    assert cmd.linear[2] * 0.1 == pytest.approx(0.01) and any("workspace" in n for n in cmd.notes)
    outside = np.array([0.5, 0, 0.5, 0, 0, 0])  # already above the box: not pushed further, not yanked back
    assert safe_command([0, 0, 0.02, 0, 0, 0, 1], outside, 0.1, lim).linear[2] == 0
    assert safe_command([0, 0, -0.02, 0, 0, 0, 1], outside, 0.1, lim).linear[2] == pytest.approx(-0.2)
    # closed loop on the fake arm: a policy that always goes up stops at the box's top face
    arm = robot.KortexArm(IP, "admin", "admin")
    with caplog.at_level(logging.WARNING, logger="robot"):
        episode(arm, {}, ConstPolicy([0, 0, 0.02, 0, 0, 0, 1]), clock, lim, max_steps=10)
    assert "workspace" in caplog.text
    assert hw.p[2] <= 0.45 + 1e-6 and hw.p[2] > 0.44
    arm.close()


def test_step_limits_scale_translation_and_rotation():
    lim = Limits(step_m=0.02, step_rad=np.radians(5), speed_m=10, speed_rad=10)
    pose = np.array([0.5, 0, 0.3, 0, 0, 0])
    cmd = safe_command([0.03, 0.04, 0, 0, 0, np.radians(8), -1], pose, 0.1, lim)
    np.testing.assert_allclose(cmd.linear * 0.1, [0.012, 0.016, 0], atol=1e-12)  # direction kept, |d| = 0.02
    np.testing.assert_allclose(cmd.angular * 0.1, [0, 0, np.radians(5)], atol=1e-12)
    assert cmd.gripper == 1.0 and len(cmd.notes) == 2  # -1 (closed) -> Robotiq position 1
    small = safe_command([0.01, 0, 0, 0, 0, 0, 1], pose, 0.1, lim)
    assert small.notes == [] and small.gripper == 0.0


def test_speed_limits_cap_the_twist():
    lim = Limits(speed_m=0.1, speed_rad=np.radians(20))
    cmd = safe_command([0.02, 0, 0, 0.05, 0, 0, 1], np.array([0.5, 0, 0.3, 0, 0, 0]), 0.05, lim)  # 20 Hz
    assert np.linalg.norm(cmd.linear) == pytest.approx(0.1)
    assert np.linalg.norm(cmd.angular) == pytest.approx(np.radians(20))
    assert sum("speed limit" in n for n in cmd.notes) == 2


@pytest.mark.parametrize("bad", [[np.nan, 0, 0, 0, 0, 0, 1], [0.5, 0, 0, 0, 0, 0, 1], [0, 0, 0, 2.0, 0, 0, 1],
                                 [0, 0, 0, 0, 0, 0, 3.0], [0, 0, 0, 0, 0, 0]])
def test_nan_or_out_of_range_action_stops_the_arm(hw, clock, bad):
    with pytest.raises(Fault):
        safe_command(bad, np.array([0.5, 0, 0.3, 0, 0, 0]), 0.1, Limits())
    arm = robot.KortexArm(IP, "admin", "admin")
    policy = ConstPolicy([0.01, 0, 0, 0, 0, 0, 1])
    real_act = policy.act
    policy.act = lambda obs, ins: real_act(obs, ins) if len(policy.seen) < 3 else np.array(bad, np.float32)
    out = episode(arm, {}, policy, clock)
    assert out["reason"].startswith("fault") and len(twists(hw)) == 3 and names(hw)[-1] == "Stop"
    assert not hw.v.any() and len(out["actions"]) == 3  # the faulted step is not recorded
    arm.close()


@pytest.mark.parametrize("kind", ["realsense", "k4a"])
@pytest.mark.parametrize("knob", ["unplugged", "frozen"])
def test_stale_camera_watchdog_stops_the_arm(hw, clock, kind, knob):
    import pyk4a
    import pyrealsense2
    knobs = pyrealsense2.DEVICES["238122070001"] if kind == "realsense" else pyk4a.DEVICES[0]
    arm = robot.KortexArm(IP, "admin", "admin")
    cam = robot.RealSenseCamera(timeout_s=0.3) if kind == "realsense" else robot.AzureKinectCamera(timeout_s=0.3)
    policy = ConstPolicy([0.01, 0, 0, 0, 0, 0, 1])

    class Breaks:  # the camera stops delivering new frames after 3 good steps
        def read(self):
            knobs[knob] = len(policy.seen) >= 3
            return cam.read()
    try:
        out = episode(arm, {"wrist": Breaks()}, policy, clock, Limits(stale_s=0.25), max_steps=20)
    finally:
        knobs[knob] = False
    expect = "no new frame" if knob == "frozen" else ("RealSense: no frame" if kind == "realsense" else "no capture")
    assert out["reason"].startswith("fault") and expect in out["reason"]
    assert 3 <= len(twists(hw)) <= 6 and names(hw)[-1] == "Stop" and not hw.v.any()
    arm.close()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_or_ctrl_c_stops_the_arm_before_propagating(hw, clock, exc):
    arm = robot.KortexArm(IP, "admin", "admin")
    with pytest.raises(exc):
        episode(arm, {}, ConstPolicy([0.01, 0, 0, 0, 0, 0, 1], fail_at=2, exc=exc), clock)
    assert names(hw)[-1] == "Stop" and not hw.v.any() and len(twists(hw)) == 2
    arm.close()


def test_start_outside_workspace_refuses_to_move(hw, clock):
    arm = robot.KortexArm(IP, "admin", "admin")
    out = episode(arm, {}, ConstPolicy([0.01, 0, 0, 0, 0, 0, 1]), clock, Limits(box_hi=(0.5, 0.4, 0.6)))
    assert "outside the workspace" in out["reason"] and twists(hw) == []
    arm.close()


def test_dry_run_prints_commands_and_never_moves(hw, clock):
    printed = []
    arm = robot.DryRunArm(robot.KortexArm(IP, "admin", "admin"), out=printed.append)
    out = episode(arm, {}, ConstPolicy([0.01, 0, 0, 0, 0, np.radians(2), -1]), clock)
    assert out["reason"] == "step limit"
    assert twists(hw) == [] and "SendGripperCommand" not in names(hw)
    assert sum("TwistCommand" in p for p in printed) == 5 and sum("GripperCommand" in p for p in printed) == 1
    assert "linear m/s=[0.1, 0.0, 0.0]" in printed[0] and "value=1.00" in printed[1]
    np.testing.assert_allclose(hw.p, [0.576, 0.0015, 0.434])  # did not move
    arm.close()


@pytest.mark.parametrize("deadman", [1.5, None])
def test_deadman_stops_the_arm_while_a_policy_step_overruns(deadman):
    sim, moving = robot.SimArm(), []  # real clock: the deadman is a wall-clock thread

    class SlowThird(ConstPolicy):
        def act(self, obs, instruction):
            if len(self.seen) == 2:
                time.sleep(0.4)  # 8 periods at 20 Hz
                moving.append(bool(sim.v.any()))  # is the previous twist still being executed?
            return super().act(obs, instruction)
    out = robot.run_episode(sim, {}, SlowThird([0.005, 0, 0, 0, 0, 0, 1]), "x", Limits(), hz=20, max_steps=4,
                            deadman_periods=deadman)
    assert out["reason"] == "step limit" and len(out["actions"]) == 4
    assert moving == [deadman is None]


# ---- rate keeping ----

def test_rate_holds_the_period_and_reports_overruns(clock):
    rate, ticks = robot.Rate(10, clock, clock.sleep), []
    start = clock()
    for work in (0.03, 0.09, 0.25, 0.01):
        clock.sleep(work)
        ticks.append((rate.wait(), clock() - start))
    assert ticks[0] == (0.0, pytest.approx(0.1)) and ticks[1] == (0.0, pytest.approx(0.2))
    assert ticks[2][0] == pytest.approx(0.25 - 0.1) and ticks[2][1] == pytest.approx(0.45)  # late: no sleep
    assert ticks[3] == (0.0, pytest.approx(0.55))  # schedule restarted from the late tick


def test_loop_sends_one_twist_per_period(hw, clock):
    arm = robot.KortexArm(IP, "admin", "admin")
    t0, sent = clock(), []
    real = arm.send
    arm.send = lambda cmd: (sent.append(clock() - t0), real(cmd))
    episode(arm, {"wrist": robot.RealSenseCamera()}, ConstPolicy([0.01, 0, 0, 0, 0, 0, 1]), clock, hz=5, max_steps=4)
    assert np.diff(sent) == pytest.approx([0.2, 0.2, 0.2])
    arm.close()


# ---- recording ----

def test_recorded_policy_episode_loads_through_data(hw, clock, tmp_path):
    import data
    arm = robot.KortexArm(IP, "admin", "admin")
    cams = {"static": robot.AzureKinectCamera(), "wrist": robot.RealSenseCamera()}
    a = np.array([0.01, -0.005, 0.002, 0, 0, np.radians(2), -1], np.float32)
    policy = ConstPolicy(a)
    out = episode(arm, cams, policy, clock, max_steps=6, record_size=32)
    assert policy.resets == 1 and policy.seen[0]["static"] == ((720, 1280, 3), np.uint8)
    assert policy.seen[0]["state"] == ((7,), np.float32)
    assert out["images"]["static"].shape == (6, 32, 32, 3) and out["state"].shape == (6, 7)
    np.testing.assert_allclose(out["actions"], np.tile(a, (6, 1)), atol=1e-6)  # measured pose change = commanded
    path = tmp_path / "demo.h5"
    with data.EpisodeWriter(path, {"control_hz": 10, "action_convention": robot.ACTION_CONVENTION}) as w:
        w.add_episode(out["images"], out["actions"], "pick up the block", "pick", out["state"])
    ds = data.HDF5Dataset(path, window=2, chunk=3, image_size=32, state=True)
    item = ds[0]
    assert item["images"].shape == (2, 2, 3, 32, 32) and item["actions"].shape == (2, 3, 7)
    assert item["instruction"] == "pick up the block" and (item["actions"][..., 6] == -1).all()
    arm.close()


def test_cli_records_teleop_episodes_with_the_sim_backend(tmp_path, monkeypatch):
    import data
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: no waiting for Enter (even with -s)
    path = tmp_path / "teleop.h5"
    assert robot.main(["--backend", "sim", "--record", str(path), "--instruction", "wave", "--hz", "50",
                       "--max-steps", "4", "--episodes", "2", "--record-size", "16"]) == 0
    ds = data.HDF5Dataset(path, window=1, chunk=1, image_size=16)
    assert len(ds.episodes) == 2 and ds[0]["images"].shape == (1, 2, 3, 16, 16) and ds.key == "sim"


def test_teleop_gripper_label_comes_from_measured_closedness(clock):
    sim = robot.SimArm(clock)
    cams = {"static": robot.SimCamera(sim, 8, 8)}

    class Operator:  # closes the gripper at step 2 while the loop only observes
        def read(self):
            self.n = getattr(self, "n", -1) + 1
            if self.n == 2:
                sim.gripper(1.0)
            return cams["static"].read()
    out = episode(sim, {"static": Operator()}, None, clock, max_steps=6)
    assert out["actions"][:, 6].tolist() == [1, 1, -1, -1, -1, -1]
    assert out["state"][-1, 6] == pytest.approx(1.0)


def test_cli_runs_a_real_tiny_policy_checkpoint_on_the_sim_arm(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    import data
    import vla
    torch.manual_seed(0)
    model = vla.VLA(vla.VLAConfig.tiny(image_size=32, head_width=32, head_layers=1, head_heads=2, head_mlp=(32,),
                                       window=2, chunk=2, shift_aug=False,
                                       backbone_kwargs=dict(patch=8, vision_dim=32, vision_layers=1, vision_heads=2,
                                                            d=32, layers=1, heads=2)))
    demo = np.random.default_rng(0).uniform(-0.005, 0.005, (50, 7))  # robot units: metres / radians per step
    demo[:, 6] = np.sign(demo[:, 6])
    vla.save_checkpoint(tmp_path / "run", model, {"kinova": data.compute_action_stats(demo)})
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = robot.main(["--backend", "sim", "--ckpt", str(tmp_path / "run"), "--instruction", "open the drawer",
                         "--hz", "20", "--max-steps", "4", "--record", str(tmp_path / "rollout.h5"),
                         "--record-size", "32"])
    finally:
        torch.set_num_threads(n_threads)
    assert rc == 0
    ds = data.HDF5Dataset(tmp_path / "rollout.h5", window=2, chunk=2, image_size=32)
    import h5py
    with h5py.File(tmp_path / "rollout.h5", "r") as f:
        a = f["episodes/ep_000000/actions"][()]
        assert f.attrs["action_convention"] == robot.ACTION_CONVENTION
    assert a.shape == (4, 7) and set(a[:, 6].tolist()) <= {-1.0, 1.0} and ds[0]["instruction"] == "open the drawer"
    # however long inference takes, the deadman bounds the travel per command: 0.2 m/s (speed cap) x 1.5 periods
    # = 0.015 m, plus slack for thread scheduling on a loaded machine
    assert np.linalg.norm(a[:, :3], axis=1).max() <= 0.03
