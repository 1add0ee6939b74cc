"""Fake calvin_env.envs.play_table_env: same entry points and data layouts as the real module, scripted world.

What is faithful to the real env (see shared/reference/env-and-robot-apis.md section 1):
  * get_env(dataset_path, obs_space=None, show_gui=True, **kwargs) needs <dataset_path>/.hydra/merged_config.yaml
    and keeps only the cameras named in obs_space;
  * reset(robot_obs=None, scene_obs=None) -> obs; get_obs(); step(action) -> (obs, 0, False, info); get_info();
  * obs = {"rgb_obs": {"rgb_static": (200,200,3) uint8, "rgb_gripper": (84,84,3) uint8},
           "depth_obs": {...float32...}, "robot_obs": (15,) float64, "scene_obs": (24,) float64};
  * a 7-d action is relative: position x 0.02 m and orientation x 0.05 rad, *scaled in place* when it is an
    ndarray (the pinned version's bug), accumulated on a target pose; a 3-tuple is absolute;
    the gripper must be exactly -1 or 1 (AssertionError otherwise);
  * info = {"robot_info": {..., "uid", "contacts"}, "scene_info": {"fixed_objects", "movable_objects", "doors",
    "buttons", "switches", "lights"}}, fresh dicts on every call.

The scripted world (not physics): while the gripper is closed (-1) the drawer joint follows the TCP's x motion
(0 .. 0.22), the sliding door follows its y motion (0 .. 0.28) and the switch its z motion (0 .. 0.088, the
light bulb is on above 0.044); with the gripper open, a downward step (dz < -0.015 m) is a button press that
toggles the LED. Blocks never move, so block tasks never succeed.
"""

from pathlib import Path

import numpy as np

STATIC_CAMS = {"static": (200, 200), "gripper": (84, 84), "tactile": (160, 120)}
ROBOT_UID, TABLE_UID = 1, 3
DRAWER_MAX, SLIDER_MAX, SWITCH_MAX = 0.22, 0.28, 0.088


def get_env(dataset_path, obs_space=None, show_gui=True, **kwargs):
    conf = Path(dataset_path) / ".hydra" / "merged_config.yaml"
    if not conf.exists():
        raise FileNotFoundError(conf)
    cams = dict(STATIC_CAMS)
    if obs_space is not None:
        keep = {k.split("_", 1)[1] for k in list(obs_space["rgb_obs"]) + list(obs_space["depth_obs"])}
        cams = {k: v for k, v in cams.items() if k in keep}
    return PlayTableSimEnv(cameras=cams, show_gui=show_gui)


class PlayTableSimEnv:
    def __init__(self, cameras, show_gui=False):
        self.cameras, self.show_gui = cameras, show_gui
        self.robot_obs, self.scene_obs = np.zeros(15), np.zeros(24)
        self.n_resets, self.n_steps, self.received = 0, 0, []  # test instrumentation
        self.reset_args = []
        self.reset()
        self.n_resets, self.reset_args = 0, []

    # --- gym-like API ------------------------------------------------------------------------------------
    def reset(self, robot_obs=None, scene_obs=None):
        self.n_resets += 1
        self.reset_args.append((None if robot_obs is None else np.array(robot_obs),
                                None if scene_obs is None else np.array(scene_obs)))
        self.scene_obs = np.zeros(24) if scene_obs is None else np.array(scene_obs, dtype=np.float64)
        if robot_obs is None:
            robot_obs = np.zeros(15)
            robot_obs[6], robot_obs[14] = 0.08, 1.0
        self.robot_obs = np.array(robot_obs, dtype=np.float64)
        self.target = self.robot_obs[:6].copy()
        self.button_down = False
        return self.get_obs()

    def step(self, action):
        self.received.append(action)
        if isinstance(action, tuple) and len(action) == 3:  # absolute: (pos, orn, gripper)
            pos, orn, gripper = action
            gripper = gripper if isinstance(gripper, int) else gripper[0]  # a bare float fails len() in the real env
            delta = np.asarray(pos, dtype=np.float64) - self.target[:3]
            self.target = np.concatenate([pos, orn[:3]]).astype(np.float64)
        else:
            if not isinstance(action, np.ndarray):
                action = np.array(action, dtype=np.float64)  # lists are copied by np.split in the real env
            rel_pos, rel_orn, gripper = np.split(action, [3, 6])  # views: the scaling below mutates `action`
            rel_pos *= 0.02
            rel_orn *= 0.05
            gripper = gripper[0]
            delta = rel_pos.copy()
            self.target[:3] += rel_pos
            self.target[3:6] += rel_orn
        assert gripper in (-1, 1)
        self.n_steps += 1
        closed = gripper == -1
        if closed:
            self.scene_obs[1] = np.clip(self.scene_obs[1] + delta[0], 0, DRAWER_MAX)
            self.scene_obs[0] = np.clip(self.scene_obs[0] + delta[1], 0, SLIDER_MAX)
            self.scene_obs[3] = np.clip(self.scene_obs[3] + delta[2], 0, SWITCH_MAX)
            self.scene_obs[4] = float(self.scene_obs[3] > SWITCH_MAX / 2)
        pressed = (not closed) and delta[2] < -0.015
        if pressed and not self.button_down:
            self.scene_obs[5] = 1.0 - self.scene_obs[5]  # LED toggles on each press edge
        self.button_down = pressed
        self.robot_obs[:6] = self.target
        self.robot_obs[6] = 0.0 if closed else 0.08
        self.robot_obs[14] = float(gripper)
        return self.get_obs(), 0, False, self.get_info()

    def get_obs(self):
        rgb, depth = {}, {}
        level = int(255 * self.scene_obs[1] / DRAWER_MAX)  # the static view brightens as the drawer opens
        for name, (h, w) in self.cameras.items():
            rgb[f"rgb_{name}"] = np.full((h, w, 6 if name == "tactile" else 3), level, dtype=np.uint8)
            depth[f"depth_{name}"] = np.ones((h, w, 2) if name == "tactile" else (h, w), dtype=np.float32)
        return {"rgb_obs": rgb, "depth_obs": depth, "robot_obs": self.robot_obs.copy(),
                "scene_obs": self.scene_obs.copy()}

    def get_state_obs(self):
        return {"robot_obs": self.robot_obs.copy(), "scene_obs": self.scene_obs.copy()}

    def get_info(self):
        blocks = {}
        for k, color in enumerate(("red", "blue", "pink")):
            p = self.scene_obs[6 + 6 * k: 12 + 6 * k]
            blocks[f"block_{color}"] = {"uid": 4 + k, "current_pos": p[:3].copy(), "current_orn": np.array([0, 0, 0, 1.0]),
                                        "current_lin_vel": np.zeros(3), "current_ang_vel": np.zeros(3),
                                        "contacts": [(0, 4 + k, TABLE_UID, -1, 0)]}
        return {"robot_info": {"tcp_pos": self.robot_obs[:3].copy(), "tcp_orn": self.robot_obs[3:6].copy(),
                               "gripper_opening_width": self.robot_obs[6], "arm_joint_states": self.robot_obs[7:14].copy(),
                               "gripper_action": self.robot_obs[14], "uid": ROBOT_UID, "contacts": []},
                "scene_info": {
                    "fixed_objects": {"table": {"uid": TABLE_UID, "links": {"base_link": -1, "drawer_link": 2,
                                                                            "plank_link": 3}, "contacts": []}},
                    "movable_objects": blocks,
                    "doors": {"base__slide": {"current_state": float(self.scene_obs[0])},
                              "base__drawer": {"current_state": float(self.scene_obs[1])}},
                    "buttons": {"base__button": {"joint_state": 0.0, "logical_state": int(self.scene_obs[5])}},
                    "switches": {"base__switch": {"joint_state": float(self.scene_obs[3]),
                                                  "logical_state": int(self.scene_obs[4])}},
                    "lights": {"lightbulb": {"logical_state": int(self.scene_obs[4])},
                               "led": {"logical_state": int(self.scene_obs[5])}}}}

    def render(self, mode="rgb_array"):
        return self.get_obs()["rgb_obs"].get("rgb_static")

    def seed(self, seed=None):
        pass

    def close(self):
        pass
