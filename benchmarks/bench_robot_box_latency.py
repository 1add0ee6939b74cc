"""How far past the workspace box's top does the tool get when the policy is slow? (issue #15, robot.py)

    python benchmarks/bench_robot_box_latency.py [--latency-ms 0 50 90 140] [--hz 10] [--steps 15] [--clock real]

robot.SimArm at --hz with a policy that always asks to go up 2 cm per step and takes --latency-ms to answer
(a sleep inside act, like inference). The box top is z = 0.35 m, the tool starts at z = 0.30 m. The tool's
height is tracked at every arm call (between calls SimArm moves on a straight line, so the largest height is
at one of them). --clock real: wall clock, the deadman thread on (1.5 periods), as on the robot; timings
depend on the machine's load. --clock fake: a simulated clock advanced by the latency, deadman off
(deterministic). Prints the largest z per latency.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robot  # noqa: E402

TOP = 0.35


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, dt):
        self.t += max(dt, 0.0)


class Up:
    """Always +2 cm in z; sleeps `latency` s in act (the inference time)."""
    def __init__(self, latency, sleep):
        self.latency, self.sleep = latency, sleep

    def reset(self):
        pass

    def act(self, obs, instruction):
        self.sleep(self.latency)
        return np.array([0, 0, 0.02, 0, 0, 0, 1], np.float32)


def max_z(latency, hz, steps, clock_kind):
    clock, sleep = (time.monotonic, time.sleep) if clock_kind == "real" else (FakeClock(),) * 2
    if clock_kind == "fake":
        sleep = clock.sleep
    arm, peak = robot.SimArm(clock), [0.0]
    advance = arm._advance

    def tracked(**new):
        advance(**new)
        peak[0] = max(peak[0], float(arm.p[2]))
    arm._advance = tracked
    lim = robot.Limits(box_hi=(0.80, 0.40, TOP))
    robot.run_episode(arm, {}, Up(latency, sleep), "go up", lim, hz=hz, max_steps=steps, clock=clock, sleep=sleep,
                      deadman_periods=1.5 if clock_kind == "real" else None)
    return peak[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0, 50, 90, 140])
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--clock", choices=("real", "fake"), default="real")
    args = p.parse_args()
    import logging
    logging.disable(logging.WARNING)  # the clamp notes would flood the output
    print(f"box top z = {TOP} m, {args.hz:g} Hz, {args.steps} steps, clock {args.clock}")
    for ms in args.latency_ms:
        print(f"latency {ms:5.0f} ms: max z = {max_z(ms / 1e3, args.hz, args.steps, args.clock):.5f} m")


if __name__ == "__main__":
    main()
