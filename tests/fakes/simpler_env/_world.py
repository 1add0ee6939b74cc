"""The scripted world behind the SimplerEnv test double.

A point gripper (tcp, metres) and one object. Each env step moves the tcp by the action's xyz (an axis-angle
rotation is accumulated but has no effect). Gripper semantics follow the real controllers:
  Google robot: delta joint target, positive closes: closedness += 0.25 * g, clipped to [0, 1]; closed above 0.75
    (so a single +2 step does not close it: the sticky repeat of 2 does);
  WidowX: absolute, closed iff g < 0.
Closing within 1 cm of the object grasps it; a grasped object follows the tcp (drawer handles only along x).
Success per env kind, re-evaluated every step (not sticky, like the real envs): "lift" object 2 cm above its start
while grasped; "place" object released within 2 cm (xy) of a target 5 cm to +y of its start; "open"/"close"
handle moved +15 cm / -15 cm along x; "apple": a drawer handle 5 cm to -x and -y of the tcp's start as well, grasped the
same way and pulled along +x (qpos = how far); stats qpos, is_drawer_open (ever qpos >= 0.15), has_contact (steps
with the apple placed, our stand-in for touching the drawer bottom); success = second subtask active and qpos >= 0.05
and has_contact >= 1, as PlaceObjectInClosedDrawerInSceneEnv.evaluate. The second subtask starts on
advance_to_next_subtask() or, like the real env's step(), at the START of the first step taken with
elapsed_steps >= 100 (step 101): the instruction read after step 100 is still the first one.
"""

from pathlib import Path

import numpy as np

_GOOGLE = "google_robot_static"
ENV_IDS = {  # env id -> (kind, instruction(s))
    "GraspSingleOpenedCokeCanInScene-v0": ("lift", ["pick coke can"]),
    "MoveNearGoogleBakedTexInScene-v0": ("place", ["move blue plastic bottle near pepsi can"]),
    "MoveNearGoogleBakedTexInScene-v1": ("place", ["move blue plastic bottle near pepsi can"]),
    **{f"{v}{d}DrawerCustomInScene-v0": (v.lower(), [f"{v.lower()} {d.lower()} drawer"])
       for v in ("Open", "Close") for d in ("Top", "Middle", "Bottom")},
    "PlaceIntoClosedTopDrawerCustomInScene-v0": ("apple", ["open top drawer", "place apple into top drawer"]),
    "PutSpoonOnTableClothInScene-v0": ("place", ["put the spoon on the towel"]),
    "PutCarrotOnPlateInScene-v0": ("place", ["put carrot on plate"]),
    "StackGreenCubeOnYellowCubeBakedTexInScene-v0": ("place", ["stack the green block on the yellow block"]),
    "PutEggplantInBasketScene-v0": ("place", ["put eggplant into yellow basket"]),
}
_KWARGS = {"obs_mode", "robot", "sim_freq", "control_mode", "control_freq", "max_episode_steps", "scene_name",
           "camera_cfgs", "rgb_overlay_path", "rgb_overlay_cameras", "urdf_version", "lr_switch", "upright",
           "laid_vertically", "shader_dir", "station_name", "light_mode", "disable_bad_material", "model_ids"}
_CONTROL = {"google": "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos_interpolate_by_planner",
            "widowx": "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"}
CREATED = []  # every env built in this process (test instrumentation)


class NameNotFound(Exception):
    pass


def make_env(env_name, max_episode_steps=None, **kwargs):
    if env_name not in ENV_IDS:
        raise NameNotFound(f"Environment {env_name} doesn't exist.")
    unknown = set(kwargs) - _KWARGS
    if unknown:
        raise TypeError(f"{env_name}.__init__() got unexpected keyword argument(s) {sorted(unknown)}")
    env = TimeLimit(_Env(env_name, **kwargs), max_episode_steps)
    CREATED.append(env)
    return env


class TimeLimit:
    """gymnasium<1.0 TimeLimit: truncates at max_episode_steps and forwards unknown attributes to the env."""

    def __init__(self, env, max_episode_steps):
        self.env, self._max_episode_steps, self._elapsed_steps = env, max_episode_steps, None

    def reset(self, **kwargs):
        self._elapsed_steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._elapsed_steps += 1
        if self._max_episode_steps is not None and self._elapsed_steps >= self._max_episode_steps:
            truncated = True
        return obs, reward, terminated, truncated, info

    @property
    def unwrapped(self):
        return self.env

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.env, name)


class _Env:
    def __init__(self, env_name, robot, control_mode, rgb_overlay_path=None, obs_mode="rgbd", **kwargs):
        self.env_name, self.kind, self.instructions = env_name, *ENV_IDS[env_name]
        self.robot_uid, self.kwargs, self.closed_env = robot, kwargs, False
        self.google = _GOOGLE in robot
        if control_mode != _CONTROL["google" if self.google else "widowx"]:
            raise NotImplementedError(f"control mode {control_mode} not supported by {robot}")
        if rgb_overlay_path is not None and not Path(rgb_overlay_path).exists():
            raise FileNotFoundError(f"rgb_overlay_path {rgb_overlay_path} is not found.")
        self.rgb_overlay_path = rgb_overlay_path
        self.image_shape = (512, 640, 3) if self.google else (480, 640, 3)
        self.camera = "overhead_camera" if self.google else "3rd_view_camera"
        self.received, self.reset_options = [], []

    # --- gymnasium API ---------------------------------------------------------------------------------------
    def reset(self, seed=None, options=None):
        options = options or {}
        self.reset_options.append(options)
        obj = options.get("obj_init_options", {})
        shift = 0.01 * (obj.get("episode_id", 0) % 3) + float(np.sum(obj.get("init_xy", [0.0, 0.0]))) * 0.01
        self.tcp, self.rotvec = np.zeros(3), np.zeros(3)
        self.obj0 = np.array([0.05 + shift, 0.0, 0.0])
        self.obj, self.closedness, self.grasped = self.obj0.copy(), 0.0, False
        self.subtask, self.elapsed_steps, self.consecutive = 0, 0, 0
        self.handle0 = np.array([-0.05, -0.05, 0.0])  # apple: the drawer handle (qpos = its +x displacement)
        self.handle, self.holding = self.handle0.copy(), False
        # the real envs' cumulative stats: Bridge put-on tasks and Google grasp tasks name them differently
        self.episode_stats = ({"is_src_obj_grasped": False, "consecutive_grasp": False} if not self.google else
                              {"n_lift_significant": 0, "consec_grasp": False, "grasped": False} if self.kind == "lift"
                              else {"qpos": 0.0, "is_drawer_open": False, "has_contact": 0} if self.kind == "apple"
                              else {})
        return self._obs(), {"scene_name": self.kwargs.get("scene_name"), "episode_id": obj.get("episode_id")}

    def step(self, action):
        if action is None:
            pass
        elif isinstance(action, dict):
            action = action["action"]
        elif not isinstance(action, np.ndarray):
            raise TypeError(type(action))
        assert action.shape == (7,), f"action shape {action.shape} != (7,)"  # the controllers assert part shapes
        if self.kind == "apple" and self.subtask == 0 and self.elapsed_steps >= 100:
            self.advance_to_next_subtask()  # force_advance_subtask_time_steps = 100, checked before stepping
        self.received.append(action.copy())
        self.tcp = self.tcp + action[:3]
        self.rotvec = self.rotvec + action[3:6]
        g = float(action[6])
        if self.google:
            self.closedness = float(np.clip(self.closedness + 0.25 * g, 0.0, 1.0))
            closed = self.closedness > 0.75
        else:
            closed = g < 0
        if closed and not self.grasped and np.linalg.norm(self.tcp - self.obj) < 0.01:
            self.grasped = True
        elif closed and self.kind == "apple" and not self.grasped and np.linalg.norm(self.tcp - self.handle) < 0.01:
            self.holding = True
        if not closed:
            self.grasped = self.holding = False
        if self.holding:
            self.handle[0] = max(self.tcp[0], self.handle0[0])
        if self.grasped:
            if self.kind in ("open", "close"):
                self.obj[0] = self.tcp[0]
            else:
                self.obj = self.tcp.copy()
        self.elapsed_steps += 1
        self.consecutive = self.consecutive + 1 if self.grasped else 0
        st = self.episode_stats
        if "is_src_obj_grasped" in st:
            st["is_src_obj_grasped"] = st["is_src_obj_grasped"] or self.grasped
            st["consecutive_grasp"] = st["consecutive_grasp"] or self.consecutive >= 5
        elif "grasped" in st:
            st["grasped"] = st["grasped"] or self.grasped
            st["consec_grasp"] = st["consec_grasp"] or self.consecutive >= 5
            st["n_lift_significant"] += int(self.grasped and self.obj[2] - self.obj0[2] > 0.02)
        elif "is_drawer_open" in st:
            st["qpos"] = float(self.handle[0] - self.handle0[0])
            st["is_drawer_open"] = st["is_drawer_open"] or st["qpos"] >= 0.15
            st["has_contact"] += int(self._placed())
        success = self._success()
        info = {"elapsed_steps": self.elapsed_steps, "success": success, "is_src_obj_grasped": self.grasped,
                "episode_stats": self.episode_stats}
        return self._obs(), float(success), bool(success), False, info

    def _success(self):
        d = self.obj - self.obj0
        if self.kind == "lift":
            return bool(self.grasped and d[2] > 0.02)
        if self.kind == "open":
            return bool(d[0] >= 0.15)
        if self.kind == "close":
            return bool(d[0] <= -0.15)
        if self.kind == "apple":
            st = self.episode_stats
            return bool(self.subtask == 1 and st["qpos"] >= 0.05 and st["has_contact"] >= 1)
        return self._placed()

    def _placed(self):
        d = self.obj - self.obj0
        return bool((not self.grasped) and abs(d[0]) < 0.02 and abs(d[1] - 0.05) < 0.02)

    def _obs(self):
        rgb = np.zeros(self.image_shape, dtype=np.uint8)
        rgb[..., 0] = 255 if self.grasped else 0
        return {"image": {self.camera: {"rgb": rgb, "depth": np.ones(self.image_shape[:2] + (1,), np.float32),
                                        "Segmentation": np.zeros(self.image_shape[:2] + (4,), np.uint32)},
                          "base_camera": {"rgb": np.zeros((128, 128, 3), np.uint8)}},
                "agent": {"qpos": np.zeros(8), "qvel": np.zeros(8), "controller": {},
                          "base_pose": np.array([0, 0, 0, 1.0, 0, 0, 0])},
                "extra": {"tcp_pose": np.concatenate([self.tcp, [1.0, 0, 0, 0]])}}

    # --- SimplerEnv extras -----------------------------------------------------------------------------------
    def get_language_instruction(self):
        return self.instructions[self.subtask]

    def is_final_subtask(self):
        return self.subtask == len(self.instructions) - 1

    def advance_to_next_subtask(self):
        if len(self.instructions) == 1:
            raise NotImplementedError
        self.subtask = min(self.subtask + 1, len(self.instructions) - 1)

    def close(self):
        self.closed_env = True
