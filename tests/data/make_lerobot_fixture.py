"""Writes tests/data/lerobot_v30_fixture with the LeRobot library's own writer (LeRobotDataset.create, add_frame,
save_episode, finalize), for tests/test_formats.py. lerobot needs Python >= 3.12; its standalone copy
`lerobot-dataset` (import name ledataset, codebase v3.0) installs on 3.11. Run it in a throwaway venv, it
pins other versions of numpy and av:

    python -m venv --system-site-packages /tmp/lrvenv && /tmp/lrvenv/bin/pip install lerobot-dataset==0.4.4
    /tmp/lrvenv/bin/python tests/data/make_lerobot_fixture.py

Frames are flat colours (tests/test_formats.colour), so a decoded frame names its episode and frame index.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from ledataset.datasets.lerobot_dataset import LeRobotDataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]
from test_formats import make_episode  # noqa: E402

OUT = HERE / "lerobot_v30_fixture"
EPISODES = [make_episode(0, 7, size=(48, 64)), make_episode(1, 8, size=(48, 64), tasks=("open the drawer", "close the drawer")),
            make_episode(2, 6, size=(48, 64))]

if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    cams = ("observation.images.front", "observation.images.wrist")
    features = {"action": {"dtype": "float32", "shape": (7,), "names": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]},
                "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
                **{k: {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]} for k in cams}}
    ds = LeRobotDataset.create("test/lerobot_v30_fixture", fps=10, features=features, root=OUT, robot_type="test_arm")
    for d in EPISODES:
        for t in range(len(d["actions"])):
            ds.add_frame({"action": d["actions"][t], "observation.state": d["state"][t], "task": d["task"][t],
                          **{k: d["images"][c][t] for c, k in enumerate(cams)}})
        ds.save_episode()
    ds.finalize()
    print("written", OUT, sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file()), "bytes")
