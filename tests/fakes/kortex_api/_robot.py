"""The kinematic Gen3 + Robotiq 2F-85 behind the kortex_api double (test-only; not part of the real API).

It integrates the current twist over `clock` time (default time.monotonic; tests inject a fake clock), clamps
twists to the controller's hard limits (0.5 m/s, 100 deg/s), keeps a twist until the next one or Stop(),
refuses commands while in fault or without a session, and logs every RPC in `calls` for the tests.
"""
import time

import numpy as np

from kortex_api.Exceptions.KServerException import KServerException
from kortex_api.autogen.messages import Base_pb2, Common_pb2

ARMS = {}  # ip -> FakeGen3: the "network"
HOME = (0.576, 0.0015, 0.434, 90.0, 0.0, 90.0)  # Gen3 Home tool pose: m, deg (Euler xyz extrinsic)
MAX_LINEAR, MAX_ANGULAR = 0.5, 100.0  # m/s, deg/s hard limits
ERROR_DEVICE, ERROR_INVALID_PARAM, SESSION_NOT_FOUND, WRONG_SERVOING_MODE, ROBOT_IN_FAULT = 1, 2, 3, 4, 5


def add_arm(ip="192.168.1.10", **kw):
    ARMS[ip] = FakeGen3(**kw)
    return ARMS[ip]


def _rot(axis, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def euler_deg_to_matrix(tx, ty, tz):  # extrinsic x, then y, then z about the fixed base axes
    return _rot(2, tz) @ _rot(1, ty) @ _rot(0, tx)


def matrix_to_euler_deg(R):
    ty = np.degrees(np.arctan2(-R[2, 0], np.hypot(R[0, 0], R[1, 0])))
    return np.degrees(np.arctan2(R[2, 1], R[2, 2])), ty, np.degrees(np.arctan2(R[1, 0], R[0, 0]))


class FakeGen3:
    def __init__(self, username="admin", password="admin", pose=HOME, clock=time.monotonic, has_gripper=True):
        self.username, self.password, self.clock, self.has_gripper = username, password, clock, has_gripper
        self.p, self.R = np.array(pose[:3], float), euler_deg_to_matrix(*pose[3:])
        self.v, self.w = np.zeros(3), np.zeros(3)  # m/s, deg/s in the base frame
        self.grip, self.grip_target = 0.0, 0.0  # %, 0 = open
        self.fault, self.servoing = False, Base_pb2.SINGLE_LEVEL_SERVOING
        self.sessions, self.calls, self.t = 0, [], clock()
        self.overlaps = []  # RPCs sent while another thread was sending on the same transport (TCPTransport)
        self.trace = []  # (time, position) after every RPC: between RPCs the tool moves on a straight line

    # -- kinematics --
    def advance(self):
        now = self.clock()
        dt, self.t = max(now - self.t, 0.0), now
        self.p = self.p + self.v * dt
        angle = np.linalg.norm(self.w) * dt
        if angle > 0:  # rotate about the base-frame axis w by angle (deg)
            k = self.w / np.linalg.norm(self.w)
            K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            a = np.radians(angle)
            self.R = (np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K) @ self.R
        self.grip += float(np.clip(self.grip_target - self.grip, -150 * dt, 150 * dt))  # ~0.7 s full stroke
        self.trace.append((now, self.p.copy()))

    def pose(self):
        return (*self.p, *matrix_to_euler_deg(self.R))

    # -- RPC checks --
    def rpc(self, name, msg=None, moving=False):
        if self.sessions <= 0:
            raise KServerException(ERROR_DEVICE, SESSION_NOT_FOUND, f"{name}: no session (call CreateSession)")
        self.calls.append((name, msg))
        self.advance()
        if moving and self.fault:
            raise KServerException(ERROR_DEVICE, ROBOT_IN_FAULT, f"{name}: robot is in fault, call ClearFaults")

    def twist(self, cmd):
        if self.servoing != Base_pb2.SINGLE_LEVEL_SERVOING:
            raise KServerException(ERROR_DEVICE, WRONG_SERVOING_MODE, "twist commands need SINGLE_LEVEL_SERVOING")
        t = cmd.twist
        v = np.array([t.linear_x, t.linear_y, t.linear_z])
        w = np.array([t.angular_x, t.angular_y, t.angular_z])
        frame = cmd.reference_frame
        if frame not in (Base_pb2.CARTESIAN_REFERENCE_FRAME_BASE, Base_pb2.CARTESIAN_REFERENCE_FRAME_TOOL,
                         Base_pb2.CARTESIAN_REFERENCE_FRAME_MIXED):
            raise KServerException(ERROR_DEVICE, ERROR_INVALID_PARAM, f"invalid reference frame {frame}")
        if frame == Base_pb2.CARTESIAN_REFERENCE_FRAME_TOOL:
            v = self.R @ v
        if frame != Base_pb2.CARTESIAN_REFERENCE_FRAME_BASE:
            w = self.R @ w
        self.v = v * min(1.0, MAX_LINEAR / max(np.linalg.norm(v), 1e-12))
        self.w = w * min(1.0, MAX_ANGULAR / max(np.linalg.norm(w), 1e-12))

    @property
    def active_state(self):
        return Common_pb2.ARMSTATE_IN_FAULT if self.fault else Common_pb2.ARMSTATE_SERVOING_READY
