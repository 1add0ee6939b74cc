"""Run a trained VLA on the paper's real arm (§III-D): Kinova Gen3 7-DoF + Robotiq 2F-85, an Azure Kinect
static camera and a RealSense D435i wrist camera; record demonstrations in the project's HDF5 format.
Stands on: vla (Policy, the execution modes) and data (resize_images, EpisodeWriter), imported lazily so that the
safety layer runs without torch. Offers: the command line below and run_episode.

    python robot.py --ckpt runs/x --instruction "open the drawer" --hz 10            # run a policy
    python robot.py --ckpt runs/x --instruction "open the drawer" --dry-run          # print commands, never move
    python robot.py --record demos.h5 --instruction "open the drawer" --episodes 5   # record teleoperated demos
    python robot.py --backend sim --ckpt runs/x --instruction "..."                  # no hardware at all

Read top to bottom: 1. rotations and the action convention, 2. safety (every policy action passes
safe_command; camera watchdog, rate keeping, deadman), 3. hardware (kortex_api, pyrealsense2, pyk4a, imported
lazily; a kinematic SimArm), 4. the control loop run_episode and the command line.

Control: we stream Cartesian TWISTS (velocity), not poses. A policy step is a small pose delta to reach in
1/hz s; sending delta/dt as a base-frame twist reaches it in that time and flows into the next command. Kortex
pose goals (ExecuteAction reach_pose) are point-to-point motions that accelerate and stop at every goal
(stop-and-go at 10 Hz) and preempt each other; a twist is one non-blocking call, is bounded by the controller's
own hard limits (0.5 m/s, 100 deg/s) and ends at once with Stop(), which every exit path calls. The price: the
arm keeps a twist until told otherwise, so a Deadman thread stops it when a step (e.g. inference) overruns.
"""

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

log = logging.getLogger("robot")

ACTION_CONVENTION = ("7-d [dx,dy,dz,droll,dpitch,dyaw,gripper]: translation delta of the tool in the base frame "
                     "(m) per control step; rotation delta R_next @ R_cur.T as Euler xyz extrinsic angles (rad); "
                     "gripper +1 open / -1 closed")
STATE_CONVENTION = "7-d [x,y,z (m), Euler xyz extrinsic (rad), gripper closedness 0 open .. 1 closed], base frame"
GRIPPER_CLOSED_AT = 0.2  # teleop recording: fingers >20% closed (~17 mm of the 85 mm stroke) label "close"
INSTALL = {"kortex_api": "kortex_api is not on PyPI: get kortex_api-2.6.0.post3-py3-none-any.whl from Kinova's "
                         "artifactory, `pip install protobuf==3.20 deprecated==1.2.7`, then `pip install --no-deps "
                         "kortex_api-2.6.0.post3-py3-none-any.whl` (needed on Python >= 3.10)",
           "pyrealsense2": "pip install pyrealsense2 (plus librealsense's udev rules for USB access)",
           "pyk4a": "install the Azure Kinect SDK (libk4a1.4, libk4a1.4-dev), then pip install pyk4a"}


def _vendor(name):
    """Import a hardware package only when that hardware is used; say how to install it otherwise."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is needed for this hardware but could not be imported ({e}). "
                          f"{INSTALL[name]}. Without hardware use --backend sim.") from e


# ---- 1. rotations: Kinova reports Tait-Bryan XYZ extrinsic angles, R = Rz(c) @ Ry(b) @ Rx(a) ----

def euler_xyz_to_matrix(e):
    a, b, c = np.asarray(e, dtype=np.float64)
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    return np.array([[cc * cb, cc * sb * sa - sc * ca, cc * sb * ca + sc * sa],
                     [sc * cb, sc * sb * sa + cc * ca, sc * sb * ca - cc * sa],
                     [-sb, cb * sa, cb * ca]])  # (3, 3)


def matrix_to_euler_xyz(R):
    b = np.arcsin(np.clip(-R[2, 0], -1.0, 1.0))
    return np.array([np.arctan2(R[2, 1], R[2, 2]), b, np.arctan2(R[1, 0], R[0, 0])])  # (3,) rad


def matrix_to_rotvec(R):
    """Axis * angle (3,) of a rotation matrix (Rodrigues; robust near 0 and pi)."""
    angle = np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0))
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])  # 2 sin(angle) axis
    if angle < 1e-6:
        return w / 2
    if np.pi - angle > 1e-4:
        return w * angle / (2 * np.sin(angle))
    B = (R + np.eye(3)) / 2  # near pi: R = 2 k k^T - I, so k is the largest column of B, normalized
    i = int(np.argmax(np.diag(B)))
    axis = B[:, i] / np.sqrt(B[i, i])
    return axis * angle * (1.0 if axis @ w >= 0 else -1.0)


def rotvec_to_matrix(rv):
    angle = np.linalg.norm(rv)
    if angle < 1e-12:
        return np.eye(3)
    K = np.array([[0, -rv[2], rv[1]], [rv[2], 0, -rv[0]], [-rv[1], rv[0], 0]]) / angle
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def pose_delta(pose0, pose1):
    """Training action (6,) that moves pose0 -> pose1 (poses (6,) = xyz m + Euler xyz rad)."""
    R = euler_xyz_to_matrix(pose1[3:]) @ euler_xyz_to_matrix(pose0[3:]).T  # base-frame rotation
    return np.concatenate([pose1[:3] - pose0[:3], matrix_to_euler_xyz(R)])


# ---- 2. safety ----

class Fault(RuntimeError):
    """A safety stop: the arm is stopped and the episode ends (the process keeps running)."""


@dataclasses.dataclass
class Limits:
    box_lo: tuple = (0.20, -0.40, 0.02)  # workspace box for the tool centre, base frame (m)
    box_hi: tuple = (0.80, 0.40, 0.60)
    step_m: float = 0.03  # per control step: translation (m) and rotation (rad) are scaled down to these
    step_rad: float = np.radians(10)
    speed_m: float = 0.20  # caps on the twist, m/s and rad/s (controller hard limits: 0.5 m/s, 100 deg/s)
    speed_rad: float = np.radians(45)
    reject_m: float = 0.10  # larger per-step actions are not clipped but stop the run: the policy is broken
    reject_rad: float = 0.8  # (e.g. actions left normalized, or in the wrong units)
    stale_s: float = 0.5  # camera watchdog: no new frame for this long -> stop
    stop_s: float = 0.05  # margin for the deadman's Stop() to act after its deadline (thread wake-up on a busy
    # host, the RPC): near a face the twist is slowed so that deadline + stop_s of it stays in the box


@dataclasses.dataclass
class Command:
    linear: np.ndarray  # (3,) m/s, base frame
    angular: np.ndarray  # (3,) rad/s, base frame (axis * rate)
    gripper: float  # Robotiq position: 0 open .. 1 closed
    notes: list  # what the limits changed (logged)


def safe_command(action, pose, dt, lim, max_hold=None):
    """Training-convention action (7,) at tool pose (6,) -> a Command held for dt seconds. Raises Fault on NaN,
    wrong shape or out-of-range actions; scales to the per-step limits, clamps to the box, caps the speed.
    pose: where the tool is when the command takes effect; dt: how long the command will be held (the step is
    spread over it); max_hold: the longest it can be held (the deadman's timeout, >= dt): the twist must not
    leave the box even then."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (7,) or not np.isfinite(a).all():
        raise Fault(f"policy action must be 7 finite numbers, got shape {a.shape}: {a}")
    rv = matrix_to_rotvec(euler_xyz_to_matrix(a[3:6]))  # (3,) base-frame rotation of this step
    if np.linalg.norm(a[:3]) > lim.reject_m or np.linalg.norm(rv) > lim.reject_rad or abs(a[6]) > 1.5:
        raise Fault(f"action out of range (|dxyz| > {lim.reject_m} m, |drot| > {lim.reject_rad} rad or "
                    f"|gripper| > 1.5): {np.round(a, 4)}; is the checkpoint's unnormalization right?")
    notes, p = [], np.asarray(pose[:3], dtype=np.float64)
    target = p + _cap(a[:3], lim.step_m, "step limit: translation (m)", notes)
    rv = _cap(rv, lim.step_rad, "step limit: rotation (rad)", notes)
    # clamp the target into the box; a tool already outside is never pushed further out (nor yanked in)
    clamped = np.clip(target, np.minimum(lim.box_lo, p), np.maximum(lim.box_hi, p))
    if not np.allclose(clamped, target):
        notes.append(f"workspace: target {np.round(target, 4)} clamped to {np.round(clamped, 4)}")
    lin = (clamped - p) / dt
    if max_hold is not None and max_hold > dt:  # a late next command keeps this twist for up to max_hold
        lo, hi = (np.minimum(lim.box_lo, p) - p) / max_hold, (np.maximum(lim.box_hi, p) - p) / max_hold
        if np.any(lin < lo) or np.any(lin > hi):
            notes.append(f"workspace: twist {np.round(lin, 4)} m/s slowed to stay in the box for {max_hold:.3f} s")
            lin = np.clip(lin, lo, hi)
    lin = _cap(lin, lim.speed_m, "speed limit: linear (m/s)", notes)
    ang = _cap(rv / dt, lim.speed_rad, "speed limit: angular (rad/s)", notes)
    return Command(lin, ang, 0.0 if a[6] > 0 else 1.0, notes)  # +1 open -> Robotiq 0 (open)


def _cap(v, limit, what, notes):
    n = np.linalg.norm(v)
    if n <= limit:
        return v
    notes.append(f"{what} {n:.4f} -> {limit:.4f}")
    return v * (limit / n)  # direction kept


class FrameWatchdog:
    """Faults when a camera's frame timestamp has not advanced for more than stale_s (host clock)."""
    def __init__(self, stale_s, clock):
        self.stale_s, self.clock, self.last = stale_s, clock, {}

    def check(self, name, stamp):
        now = self.clock()
        old, since = self.last.get(name, (None, now))
        if stamp != old:
            self.last[name] = (stamp, now)
        elif now - since > self.stale_s:
            raise Fault(f"camera {name!r}: no new frame for {now - since:.2f} s (limit {self.stale_s} s)")


class Rate:
    """Holds a fixed control rate; wait() returns how late the tick was (0 when on time)."""
    def __init__(self, hz, clock=time.monotonic, sleep=time.sleep):
        self.period, self.clock, self.sleep = 1.0 / hz, clock, sleep
        self.next = clock() + self.period

    def wait(self):
        now = self.clock()
        if now < self.next:
            self.sleep(self.next - now)
            self.next += self.period
            return 0.0
        late, self.next = now - self.next, now + self.period  # overrun: restart the schedule from now
        return late


class Deadman:
    """Stops the arm when no command follows within timeout_s (wall clock, own thread). A twist is meant to
    last one period, but the arm keeps it until the next command: a slow policy step would overshoot."""
    def __init__(self, arm, timeout_s):
        self.arm, self.timeout_s, self.kicked, self.armed, self.done = arm, timeout_s, threading.Event(), False, False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def kick(self):  # right after each motion command
        self.armed = True
        self.kicked.set()

    def _watch(self):
        while not self.done:
            if self.kicked.wait(self.timeout_s):
                self.kicked.clear()
            elif self.armed and not self.done:
                self.armed = False
                log.warning("no command for %.0f ms: deadman Stop()", self.timeout_s * 1e3)
                self.arm.stop()

    def close(self):
        self.done = True
        self.kicked.set()
        self.thread.join()


# ---- 3. hardware (API reference §3 kortex_api, §4.1 pyrealsense2, §4.2 pyk4a) ----

@dataclasses.dataclass
class ArmState:
    pose: np.ndarray  # (6,) xyz m + Euler xyz rad, base frame
    gripper: float  # closedness 0 open .. 1 closed
    fault: str = ""  # non-empty when the controller reports a fault

    def vector(self):
        return np.append(self.pose, self.gripper).astype(np.float32)  # (7,) STATE_CONVENTION


class KortexArm:
    """Gen3 over kortex_api: BaseClient on a TCP session (port 10000), BaseCyclicClient feedback on a UDP
    session (port 10001). Units at this boundary: metres and DEGREES (pose, angular twist); gripper 0..1.
    Two threads use the BaseClient (the loop's twists and gripper commands, the deadman's Stop()), but the
    transport's send is not thread-safe (one shared frame buffer, then sendall): every base call takes self.lock.
    The cyclic client has its own transport and only the loop thread reads it."""
    command_delay_s = 0.025  # high-level commands are applied at ~40 Hz (API reference 3.3): up to 25 ms late

    def __init__(self, ip, username, password, tcp_port=10000, udp_port=10001):
        _vendor("kortex_api")
        from kortex_api.RouterClient import RouterClient, RouterClientSendOptions
        from kortex_api.SessionManager import SessionManager
        from kortex_api.TCPTransport import TCPTransport
        from kortex_api.UDPTransport import UDPTransport
        from kortex_api.autogen.client_stubs.BaseClientRpc import BaseClient
        from kortex_api.autogen.client_stubs.BaseCyclicClientRpc import BaseCyclicClient
        from kortex_api.autogen.messages import Base_pb2, Common_pb2, Session_pb2
        self.pb, self.IN_FAULT, self.Options = Base_pb2, Common_pb2.ARMSTATE_IN_FAULT, RouterClientSendOptions
        self.links = []  # (transport, session manager or None)
        self.lock, self.client_errors, self.errors_seen = threading.Lock(), [], 0

        def connect(transport, port):
            # our own callback: the API's basicErrorCallback is an instance method, so passing it unbound makes
            # every client-side error a TypeError on the transport's receive thread, which then stops reading
            # responses (every later call, Stop() included, times out)
            router = RouterClient(transport, self._client_error)
            transport.connect(ip, port)
            self.links.append((transport, None))
            info, session = Session_pb2.CreateSessionInfo(), SessionManager(router)
            info.username, info.password = username, password
            info.session_inactivity_timeout, info.connection_inactivity_timeout = 10000, 2000  # ms
            try:
                session.CreateSession(info)
            except Exception as e:
                raise ConnectionError(f"Kinova at {ip}:{port} refused a session for {username!r} ({e}); check --ip, "
                                      f"--username, --password (or KINOVA_IP, KINOVA_USERNAME, KINOVA_PASSWORD)") from e
            self.links[-1] = (transport, session)
            return router
        try:
            self.base = BaseClient(connect(TCPTransport(), tcp_port))
            self.cyclic = BaseCyclicClient(connect(UDPTransport(), udp_port))
            mode = Base_pb2.ServoingModeInformation()
            mode.servoing_mode = Base_pb2.SINGLE_LEVEL_SERVOING  # twists need high-level servoing
            with self.lock:
                self.base.SetServoingMode(mode)
        except BaseException:
            self._disconnect()
            raise

    def _client_error(self, exception):
        """kortex_api's errorCallback(exception), called on a transport's receive thread (a frame that could not
        be decoded, a response to no pending request, ...): log it; state() turns it into a safety stop."""
        log.error("kortex_api client error: %s", exception)
        self.client_errors.append(str(exception))

    def _disconnect(self):
        for transport, session in reversed(self.links):
            try:
                if session is not None:
                    options = self.Options()
                    options.timeout_ms = 1000
                    session.CloseSession(options)
            finally:
                transport.disconnect()
        self.links = []

    def state(self):
        fb = self.cyclic.RefreshFeedback()
        b, motors = fb.base, fb.interconnect.gripper_feedback.motor
        if len(motors) == 0:
            raise Fault("no gripper feedback from the interconnect: is the Robotiq 2F-85 connected?")
        fault = ""
        if len(self.client_errors) > self.errors_seen:  # the link lost or garbled a frame: stop, do not guess
            fault = f"kortex_api client error: {self.client_errors[-1]}"
            self.errors_seen = len(self.client_errors)
        elif b.active_state == self.IN_FAULT or b.fault_bank_a or b.fault_bank_b:
            fault = f"arm in fault (state {b.active_state}, fault banks {b.fault_bank_a:#x}/{b.fault_bank_b:#x})"
        pose = np.array([b.tool_pose_x, b.tool_pose_y, b.tool_pose_z,
                         *np.radians([b.tool_pose_theta_x, b.tool_pose_theta_y, b.tool_pose_theta_z])])
        return ArmState(pose, motors[0].position / 100.0, fault)  # gripper feedback is 0..100 %

    def send(self, cmd):
        tw = self.pb.TwistCommand()
        tw.reference_frame = self.pb.CARTESIAN_REFERENCE_FRAME_BASE
        tw.duration = 0  # "not implemented": the twist holds until the next command or Stop()
        tw.twist.linear_x, tw.twist.linear_y, tw.twist.linear_z = map(float, cmd.linear)
        tw.twist.angular_x, tw.twist.angular_y, tw.twist.angular_z = map(float, np.degrees(cmd.angular))
        with self.lock:
            self.base.SendTwistCommand(tw)

    def gripper(self, closed):
        g = self.pb.GripperCommand()
        g.mode = self.pb.GRIPPER_POSITION
        finger = g.gripper.finger.add()
        finger.finger_identifier, finger.value = 1, float(closed)  # 0 open .. 1 closed
        with self.lock:
            self.base.SendGripperCommand(g)

    def stop(self):
        with self.lock:
            self.base.Stop()

    def close(self):
        try:
            self.stop()
        finally:
            self._disconnect()


class RealSenseCamera:
    """RealSense color stream -> (H, W, 3) uint8 RGB + device timestamp (s)."""
    def __init__(self, serial=None, width=640, height=480, fps=30, timeout_s=1.0):
        rs = _vendor("pyrealsense2")
        self.pipe, cfg, self.timeout_ms = rs.pipeline(), rs.config(), int(timeout_s * 1000)
        if serial:
            cfg.enable_device(serial)
        cfg.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        self.pipe.start(cfg)

    def read(self):
        try:
            frames = self.pipe.wait_for_frames(self.timeout_ms)
        except RuntimeError as e:
            raise Fault(f"RealSense: no frame within {self.timeout_ms} ms ({e})") from e
        color = frames.get_color_frame()
        if not color:
            raise Fault("RealSense: frameset without a color frame")
        return np.asanyarray(color.get_data()).copy(), color.get_timestamp() / 1000.0  # copy: buffer is recycled

    def close(self):
        self.pipe.stop()


class AzureKinectCamera:
    """Azure Kinect 720p BGRA color (depth off) -> (H, W, 3) uint8 RGB + device timestamp (s)."""
    def __init__(self, device_id=0, timeout_s=1.0):
        k4a = self.k4a = _vendor("pyk4a")
        bgra = k4a.ImageFormat.COLOR_BGRA32 if hasattr(k4a, "ImageFormat") else k4a.ColorFormat.BGRA32  # old name
        cfg = k4a.Config(color_resolution=k4a.ColorResolution.RES_720P, color_format=bgra,
                         depth_mode=k4a.DepthMode.OFF, camera_fps=k4a.FPS.FPS_30,
                         synchronized_images_only=False)  # True is refused when depth is off
        self.dev, self.timeout_ms = k4a.PyK4A(config=cfg, device_id=device_id), int(timeout_s * 1000)
        self.dev.start()

    def read(self):
        try:
            cap = self.dev.get_capture(timeout=self.timeout_ms)
        except self.k4a.K4ATimeoutException as e:
            raise Fault(f"Azure Kinect: no capture within {self.timeout_ms} ms") from e
        color = cap.color
        if color is None or color.ndim != 3:
            raise Fault("Azure Kinect: capture without a BGRA color image")
        return np.ascontiguousarray(color[..., 2::-1]), cap.color_timestamp_usec / 1e6  # BGRA -> RGB

    def close(self):
        self.dev.stop()


class SimArm:
    """Kinematic stand-in: integrates twists into the tool pose over (clock) time; gripper closes in 0.2 s."""
    def __init__(self, clock=time.monotonic):
        self.clock, self.t, self.g, self.g_target, self.lock = clock, clock(), 0.0, 0.0, threading.Lock()
        self.v = self.w = np.zeros(3)
        self.p, self.R = np.array([0.5, 0.0, 0.3]), euler_xyz_to_matrix([np.pi, 0.0, np.pi / 2])

    def _advance(self, **new):  # integrate up to now, then apply the new command (the deadman calls from a thread)
        with self.lock:
            now = self.clock()
            dt, self.t = now - self.t, now
            self.p, self.R = self.p + self.v * dt, rotvec_to_matrix(self.w * dt) @ self.R
            self.g += np.clip(self.g_target - self.g, -5 * dt, 5 * dt)
            self.__dict__.update(new)

    def state(self):
        self._advance()
        return ArmState(np.concatenate([self.p, matrix_to_euler_xyz(self.R)]), float(self.g))

    def send(self, cmd):
        self._advance(v=np.array(cmd.linear, float), w=np.array(cmd.angular, float))

    def gripper(self, closed):
        self._advance(g_target=float(closed))

    def stop(self):
        self._advance(v=np.zeros(3), w=np.zeros(3))

    close = stop


class SimCamera:
    """Synthetic frames for SimArm: a square that follows the tool's (x, y); its blue = gripper closedness."""
    def __init__(self, arm, h, w):
        self.arm, self.h, self.w = arm, h, w

    def read(self):
        img = np.zeros((self.h, self.w, 3), np.uint8)
        img[..., 0] = np.linspace(0, 255, self.w, dtype=np.uint8)
        s = self.arm.state()
        r, c = [int(np.clip((v - lo) / 0.8 * n, 0, n - 8)) for v, lo, n in zip(s.pose[:2], (0.2, -0.4), img.shape)]
        img[r:r + 8, c:c + 8] = (0, 255, int(255 * s.gripper))
        return img, self.arm.clock()

    def close(self):
        pass


class DryRunArm:
    """Reads the real arm's state but only prints the commands (Stop() is harmless and is still sent)."""
    def __init__(self, arm, out=print):
        self.arm, self.out = arm, out

    def state(self):
        return self.arm.state()

    def send(self, cmd):
        self.out(f"DRY-RUN TwistCommand(frame=BASE, linear m/s={np.round(cmd.linear, 4).tolist()}, "
                 f"angular deg/s={np.round(np.degrees(cmd.angular), 3).tolist()})")

    def gripper(self, closed):
        self.out(f"DRY-RUN GripperCommand(mode=GRIPPER_POSITION, finger 1 value={closed:.2f})")

    def stop(self):
        self.arm.stop()

    def close(self):
        self.arm.close()


# ---- 4. the control loop and the command line ----

def run_episode(arm, cameras, policy, instruction, limits, hz=10.0, max_steps=300, clock=time.monotonic,
                sleep=time.sleep, should_stop=lambda: False, record_size=None, deadman_periods=1.5):
    """observe -> policy.act -> safe_command -> arm, at `hz`; policy=None only observes (teleoperation).
    Ends on should_stop(), max_steps or a Fault (logged, not raised). Any exception or Ctrl-C stops the arm
    before it propagates. Returns {"images": {view: (T, S, S, 3)}, "actions": (T, 7), "state": (T, 7),
    "reason": str} for data.EpisodeWriter: actions are the MEASURED pose change of each step in
    ACTION_CONVENTION; gripper = the command sent (teleop: the measured closedness). deadman_periods: stop
    the arm when a step takes longer than this many periods (None: off, for tests with a fake clock)."""
    dt, watchdog, stopped, reason = 1.0 / hz, FrameWatchdog(limits.stale_s, clock), False, "step limit"
    frames, states, grips, last_grip = {v: [] for v in cameras}, [], [], None
    deadman = None
    try:
        if policy is not None:
            policy.reset()
            deadman = Deadman(arm, deadman_periods * dt) if deadman_periods else None
        s = arm.state()
        if s.fault or np.any(s.pose[:3] < limits.box_lo) or np.any(s.pose[:3] > limits.box_hi):
            raise Fault(s.fault or f"tool at {np.round(s.pose[:3], 3)} is outside the workspace box "
                        f"{limits.box_lo}..{limits.box_hi}: move it inside (or widen --workspace) first")
        rate, v_now = Rate(hz, clock, sleep), np.zeros(3)  # v_now: the linear twist the arm is executing (m/s)
        for t in range(max_steps):
            tick = clock()
            s = arm.state()  # read at the tick, so recorded deltas span exactly one period
            if s.fault:
                raise Fault(s.fault)
            obs = {"state": s.vector()}  # (7,) STATE_CONVENTION
            for view, cam in cameras.items():
                obs[view], stamp = cam.read()  # (H, W, 3) uint8 RGB
                watchdog.check(view, stamp)
            states.append(s)
            for view in cameras:
                frames[view].append(obs[view] if record_size is None else _resize(obs[view], record_size))
            if policy is None:
                log.info("step %d pose %s gripper %.2f", t, np.round(s.pose, 4), s.gripper)
            else:
                action = policy.act(obs, instruction)
                pose, hold, max_hold = _command_timing(arm, s, tick, clock, rate, v_now, deadman, limits)
                cmd = safe_command(action, pose, hold, limits, max_hold)
                for note in cmd.notes:
                    log.warning("step %d %s", t, note)
                arm.send(cmd)
                v_now = cmd.linear
                if deadman is not None:
                    deadman.kick()
                if cmd.gripper != last_grip:
                    arm.gripper(cmd.gripper)
                    last_grip = cmd.gripper
                grips.append(1.0 - 2.0 * cmd.gripper)  # back to +1 open / -1 closed
                log.info("step %d pose %s action %s -> v %s m/s w %s deg/s gripper %.0f", t, np.round(s.pose, 4),
                         np.round(action, 4), np.round(cmd.linear, 4), np.round(np.degrees(cmd.angular), 2),
                         cmd.gripper)
            late = rate.wait()
            if late > 0.5 * dt:
                log.warning("step %d overran the %.0f Hz period by %.1f ms", t, hz, late * 1e3)
            if should_stop():
                reason = "key press"
                break
        states.append(arm.state())  # one period after the last command: closes the last action
    except Fault as e:
        arm.stop()
        stopped, reason = True, f"fault: {e}"
        log.error("SAFETY STOP: %s", e)
    finally:
        if not stopped:
            arm.stop()  # every other exit (exception, Ctrl-C, normal end) stops the arm first
        if deadman is not None:
            deadman.close()
    n = max(len(states) - 1, 0)  # steps whose next state is known
    if policy is None:
        grips = [-1.0 if st.gripper > GRIPPER_CLOSED_AT else 1.0 for st in states[1:]]
    actions = [np.append(pose_delta(states[i].pose, states[i + 1].pose), grips[i]) for i in range(n)]
    return {"images": {v: np.stack(f[:n]) if n else np.zeros((0, 1, 1, 3), np.uint8) for v, f in frames.items()},
            "actions": np.array(actions, np.float32).reshape(n, 7),
            "state": np.array([st.vector() for st in states[:n]], np.float32).reshape(n, 7), "reason": reason}


def _command_timing(arm, s, tick, clock, rate, v_now, deadman, limits):
    """-> (pose, hold, max_hold) for safe_command, so the box holds however long observation + inference took.
    While the policy thought, the previous twist kept moving the arm: clamp from the pose read now (s was read at
    the tick), advanced by the current twist over the arm's command delay (Kortex applies high-level commands
    at ~40 Hz, API reference 3.3), i.e. where the tool is when this command takes effect. The twist is then held
    until the next one takes effect: the wait for the next tick plus that step's observation + inference, taken
    to last as long as this step's (tick -> now); the deadman stops it if it lasts longer (max_hold: its
    timeout plus limits.stop_s for the Stop() to act)."""
    now_s = arm.state()
    if now_s.fault:
        raise Fault(now_s.fault)
    if deadman is not None and not deadman.armed:
        v_now = np.zeros(3)  # the deadman stopped the arm
    pose = now_s.pose.copy()
    pose[:3] += v_now * getattr(arm, "command_delay_s", 0.0)
    now = clock()
    hold = max(rate.next - now, 0.0) + (now - tick)
    max_hold = None
    if deadman is not None:
        hold, max_hold = min(hold, deadman.timeout_s), deadman.timeout_s + limits.stop_s  # the deadman cuts it
    return pose, max(hold, 1e-3), max_hold


def _resize(img, size):
    from data import resize_images  # THE resize of training and Policy.act
    return resize_images(img, size).permute(1, 2, 0).numpy()  # (S, S, 3) uint8


def build_parser():
    from vla import EXECUTIONS  # imported here, as every model piece: the safety layer above runs without torch
    env, d = os.environ.get, Limits()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Credentials default to the Kinova factory values (admin/admin); override "
                                       "with flags or KINOVA_IP / KINOVA_USERNAME / KINOVA_PASSWORD.")
    p.add_argument("--ckpt", help="run directory written by train.py (omit to record teleoperated demos)")
    p.add_argument("--instruction", required=True, help="language instruction given to the policy / stored")
    p.add_argument("--task", help="task name stored with recorded episodes (default: the instruction)")
    p.add_argument("--execution", choices=EXECUTIONS, default="chunk")
    p.add_argument("--dataset-key", help="which action statistics of the checkpoint to use")
    p.add_argument("--device", default="cpu", help="torch device of the policy")
    p.add_argument("--hz", type=float, default=None,
                   help="control rate; must equal the training data's control_hz (default: that rate, else 10)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--backend", choices=("kinova", "sim"), default="kinova")
    p.add_argument("--ip", default=env("KINOVA_IP", "192.168.1.10"))
    p.add_argument("--username", default=env("KINOVA_USERNAME", "admin"))
    p.add_argument("--password", default=env("KINOVA_PASSWORD", "admin"))
    p.add_argument("--wrist-serial", default=env("REALSENSE_SERIAL"), help="RealSense serial (default: any)")
    p.add_argument("--k4a-device", type=int, default=0, help="Azure Kinect device index")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of sending them")
    p.add_argument("--record", metavar="OUT.h5", help="append each episode to this HDF5 file (data.EpisodeWriter)")
    p.add_argument("--record-size", type=int, default=256, help="stored image size (0: as captured)")
    p.add_argument("--workspace", type=float, nargs=6, metavar=("XMIN", "XMAX", "YMIN", "YMAX", "ZMIN", "ZMAX"),
                   default=[v for pair in zip(d.box_lo, d.box_hi) for v in pair], help="tool box, base frame (m)")
    p.add_argument("--max-step-m", type=float, default=d.step_m, help="translation per step (m)")
    p.add_argument("--max-step-deg", type=float, default=np.degrees(d.step_rad), help="rotation per step (deg)")
    p.add_argument("--max-speed", type=float, default=d.speed_m, help="m/s")
    p.add_argument("--max-angular-speed", type=float, default=np.degrees(d.speed_rad), help="deg/s")
    p.add_argument("--stale-s", type=float, default=d.stale_s, help="camera watchdog threshold (s)")
    return p


def _interrupt(*_):
    raise KeyboardInterrupt


EXIT_SAFETY_STOP = 3  # main()'s exit code when an episode ended in a safety stop (1: error, 130: interrupted)


def recorded_control_hz(run_dir, dataset_key=None):
    """-> (hz, source) of the data a train.py run learned from, or (None, why it is unknown).
    The checkpoint files do not store the rate; the run's train_args.json lists its --data HDF5 files, whose
    control_hz attribute (data.EpisodeWriter) does. Each action is a pose change per 1/control_hz s, so a
    policy run at another rate moves at another speed than it was shown."""
    import json
    try:
        with open(os.path.join(run_dir, "train_args.json")) as f:
            paths = json.load(f).get("data") or []
    except (OSError, ValueError) as e:
        return None, f"no readable {os.path.join(run_dir, 'train_args.json')} ({e})"
    if not paths:
        return None, f"the run in {run_dir} was not trained on --data HDF5 files"
    import h5py
    found = {}  # dataset key -> (hz, path)
    for path in paths:
        if not os.path.isfile(path):
            continue  # a CALVIN directory or a file that has moved
        try:
            with h5py.File(path, "r") as f:
                key, hz = f.attrs.get("dataset_key", os.path.splitext(os.path.basename(path))[0]), \
                    f.attrs.get("control_hz")
        except OSError:
            continue
        key = key.decode() if isinstance(key, bytes) else str(key)
        if hz is not None:
            found[key] = (float(hz), path)
    if dataset_key is not None:
        found = {k: v for k, v in found.items() if k == dataset_key}
    rates = {hz for hz, _ in found.values()}
    if len(rates) != 1:
        why = "none of them could be read" if not found else f"they differ: {found}; pass --dataset-key"
        return None, f"control_hz of the training data {paths}: {why}"
    hz, path = next(iter(found.values()))
    return hz, path


def check_hz(hz, run_dir, dataset_key=None):
    """-> the control rate to run at: the training data's control_hz when hz is None. Refuses a --hz other than
    that rate; warns when the run directory cannot tell."""
    trained, source = recorded_control_hz(run_dir, dataset_key)
    if trained is None:
        log.warning("cannot check --hz %s against the training data's rate: %s", "(default 10)" if hz is None
                    else f"{hz:g}", source)
        return 10.0 if hz is None else hz
    if hz is None:
        log.info("control rate %g Hz: the training data's control_hz (%s)", trained, source)
        return trained
    if abs(hz - trained) > 1e-6 * trained:
        raise SystemExit(f"--hz {hz:g} but the policy in {run_dir} was trained on data recorded at control_hz="
                         f"{trained:g} ({source}): each action is a pose change per 1/{trained:g} s, so it would "
                         f"move {hz / trained:.2f}x as fast as shown. Run with --hz {trained:g}.")
    return hz


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.ckpt is None and args.record is None:
        raise SystemExit("nothing to do: give --ckpt RUN_DIR to run a policy and/or --record OUT.h5 to record")
    if args.dry_run and args.record:
        raise SystemExit(f"--dry-run with --record {args.record}: a dry run never moves the arm, so every recorded "
                         f"action would be an all-zero pose change stored as a demonstration. Drop --record for a "
                         f"dry run, or drop --dry-run to record.")
    if args.hz is not None and not args.hz > 0:
        raise SystemExit(f"--hz must be a positive control rate in Hz (e.g. the training data's 10), got {args.hz}")
    w = args.workspace
    limits = Limits(tuple(w[0::2]), tuple(w[1::2]), args.max_step_m, np.radians(args.max_step_deg), args.max_speed,
                    np.radians(args.max_angular_speed), stale_s=args.stale_s)
    policy = None
    if args.ckpt:
        args.hz = check_hz(args.hz, args.ckpt, args.dataset_key)
        from vla import Policy
        policy = Policy.from_pretrained(args.ckpt, execution=args.execution, dataset_key=args.dataset_key,
                                        device=args.device)
    args.hz = 10.0 if args.hz is None else args.hz
    old_handler = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the arm like Ctrl-C does
    arm, cameras, writer, safety_stop = None, {}, None, None
    try:
        if args.backend == "sim":
            arm = SimArm()
            cameras = {"static": SimCamera(arm, 240, 320), "wrist": SimCamera(arm, 120, 160)}
        else:
            arm = KortexArm(args.ip, args.username, args.password)
            cameras = {"static": AzureKinectCamera(args.k4a_device, timeout_s=args.stale_s),
                       "wrist": RealSenseCamera(args.wrist_serial, timeout_s=args.stale_s)}
        arm = DryRunArm(arm) if args.dry_run else arm
        if args.record:
            from data import EpisodeWriter
            robot_name = "Kinova Gen3 7-DoF + Robotiq 2F-85" if args.backend == "kinova" else "robot.py SimArm"
            writer = EpisodeWriter(args.record, {"control_hz": args.hz, "action_convention": ACTION_CONVENTION,
                                                 "state_convention": STATE_CONVENTION, "robot": robot_name,
                                                 "dataset_key": "kinova" if args.backend == "kinova" else "sim"})
        key, tty = threading.Event(), sys.stdin.isatty()
        if tty:  # each Enter sets the event: it ends an episode, or starts the next one
            threading.Thread(target=lambda: [key.set() for _ in sys.stdin], daemon=True).start()
        for ep in range(args.episodes):
            if ep > 0 and tty:
                key.clear()
                log.info("reset the scene, then press Enter for the next episode")
                key.wait()
            key.clear()
            log.info("episode %d/%d: %r (press Enter to end it)", ep + 1, args.episodes, args.instruction)
            out = run_episode(arm, cameras, policy, args.instruction, limits, args.hz, args.max_steps,
                              should_stop=key.is_set, record_size=args.record_size or None)
            log.info("episode %d ended after %d steps: %s", ep + 1, len(out["actions"]), out["reason"])
            if writer is not None and len(out["actions"]):
                name = writer.add_episode(out["images"], out["actions"], args.instruction,
                                          args.task or args.instruction, out["state"])
                log.info("saved %s to %s", name, args.record)
            if out["reason"].startswith("fault"):  # a person must look before the arm moves again
                safety_stop = f"episode {ep + 1}: {out['reason']}"
                break
    except KeyboardInterrupt:
        log.warning("interrupted: arm stopped")
        return 130
    finally:
        if arm is not None:
            arm.close()  # Stop() + close the sessions
        for cam in cameras.values():
            cam.close()
        if writer is not None:
            writer.close()
        signal.signal(signal.SIGTERM, old_handler)
    if safety_stop:
        log.error("SAFETY STOP (%s); remaining episodes skipped, exit code %d", safety_stop, EXIT_SAFETY_STOP)
        return EXIT_SAFETY_STOP
    return 0


if __name__ == "__main__":
    sys.exit(main())
