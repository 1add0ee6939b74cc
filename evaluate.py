"""Closed-loop evaluation: environments behind one small adapter shape, their protocols, results tables, GIFs.

Stands on: vla.Policy and data.EpisodeWriter, imported where they are used (the environment worker processes
stay free of the model code). Offers: the adapters and protocols below, and the torchrun setup of both entry
points (init_distributed / end_distributed / rank_world, also used by train.py).

Every benchmark adapter speaks the same shape, so one `vla.Policy` drives all of them:

    obs = env.reset(seed)        -> {"static": HxWx3 uint8, "wrist": HxWx3 uint8, "state": float32 (D,)}
    obs, success = env.step(action7)   action7 = [dx, dy, dz, droll, dpitch, dyaw, gripper],
                                       gripper canonical +1 = open, -1 = closed (CALVIN convention);
                                       env.done is True once the step limit is reached
    env.instruction              -> a short natural-language instruction for the current task

Sections:
    1. Rendering backend (EGL on GPU machines, OSMesa otherwise)
    2. Meta-World: adapter, scripted experts, demonstrations, evaluation protocol
    3. Results tables and rollout GIFs (shared by all benchmarks)
    4. CALVIN: adapter, the official 1000 x 5 long-horizon protocol (Extended Table 2), rank sharding
    5. SimplerEnv: adapter, the visual-matching grids and action conversion (Extended Table 3)
    N. Command line: python evaluate.py --ckpt RUN_DIR --benchmark metaworld [--episodes N --seed S]
"""

import os
import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import shutil
import time
import sys
from pathlib import Path

import numpy as np


# -----------------------------------------------------------------------------------------------------------
# 1. Rendering backend
# -----------------------------------------------------------------------------------------------------------

def _pick_gl_backend():
    """MUJOCO_GL must be set before mujoco is imported: EGL where an NVIDIA GPU is visible, OSMesa otherwise."""
    if "MUJOCO_GL" not in os.environ:
        has_gpu = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
        os.environ["MUJOCO_GL"] = "egl" if has_gpu else "osmesa"
        if os.environ["MUJOCO_GL"] == "osmesa":
            os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    if os.environ["MUJOCO_GL"] == "osmesa" and "triton" not in sys.modules:
        # Mesa's OSMesa and triton both carry LLVM: importing triton after OSMesa is loaded segfaults (seen with
        # torch 2.14 / triton 3.8, e.g. when transformers or torch._dynamo import it). OSMesa means no GPU, and
        # triton only compiles GPU kernels, so make `import triton` fail cleanly; torch then reports no triton.
        sys.modules["triton"] = None
    return os.environ["MUJOCO_GL"]


_pick_gl_backend()  # at import, so that it precedes any `import mujoco` (metaworld imports it too)
_RENDERER = None  # one mujoco.Renderer per process (a second live one gave garbage frames under OSMesa)


def get_renderer(model, size):
    """The process's single offscreen renderer for `model` at size x size, shadows and reflections off."""
    global _RENDERER
    import mujoco
    if _RENDERER is not None and _RENDERER._model is model and _RENDERER.width == size:
        return _RENDERER
    close_renderer()
    try:
        _RENDERER = mujoco.Renderer(model, size, size)
    except Exception as e:  # noqa: BLE001 - any GL failure gets the same advice
        raise RuntimeError(
            f"MuJoCo could not create an offscreen renderer with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({e}). "
            "On a CPU machine install OSMesa (`apt-get install libosmesa6`) and set MUJOCO_GL=osmesa; "
            "on a GPU machine set MUJOCO_GL=egl (needs libegl1). MUJOCO_GL is read when mujoco is first imported: "
            "set it in the environment, or import evaluate before mujoco/metaworld") from e
    _RENDERER.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False  # speed: ~2x cheaper frames
    _RENDERER.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
    return _RENDERER


def close_renderer():
    global _RENDERER
    if _RENDERER is not None:
        _RENDERER.close()
        _RENDERER = None


# Renders one 8x8 frame of a one-geom scene: the same import and renderer creation a worker does first.
_RENDER_PROBE = """
import mujoco
m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size="0.1"/></worldbody></mujoco>')
r = mujoco.Renderer(m, 8, 8)
r.update_scene(mujoco.MjData(m))
assert r.render().shape == (8, 8, 3)
"""
_RENDER_CHECKED = set()  # environments (MUJOCO_GL, ...) already probed successfully in this process


def check_rendering(needed_for="the Meta-World demonstrations and evaluation"):
    """Fail fast, with what to install or set, when MuJoCo cannot render offscreen on this machine.

    Without OSMesa (a fresh Debian/Ubuntu box) PyOpenGL finds no library and the first frame, rendered inside a
    worker pool after seconds of set-up, dies with "AttributeError: 'NoneType' object has no attribute
    'glGetError'". The probe renders one frame in a fresh interpreter with this process's environment
    (MUJOCO_GL, PYOPENGL_PLATFORM, LD_LIBRARY_PATH): a GL library that fails to load can leave PyOpenGL and
    mujoco half-imported, so trying it in this process could break a later fix-and-retry. ~0.3 s, once per
    environment. Returns the backend (MUJOCO_GL); raises RuntimeError naming the fix."""
    import subprocess
    backend = os.environ.get("MUJOCO_GL", "")
    key = tuple(os.environ.get(k, "") for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "LD_LIBRARY_PATH"))
    if key in _RENDER_CHECKED:
        return backend
    try:
        p = subprocess.run([sys.executable, "-c", _RENDER_PROBE], capture_output=True, text=True, timeout=120)
        lines = (p.stderr or p.stdout).strip().splitlines()
        err = None if p.returncode == 0 else (lines[-1] if lines else f"exit code {p.returncode}")
    except subprocess.TimeoutExpired:
        err = "rendering one 8x8 frame took over 120 s"
    if err is None:
        _RENDER_CHECKED.add(key)
        return backend
    fix = {"osmesa": "install OSMesa: `apt-get install libosmesa6` (Debian/Ubuntu; `dnf install mesa-libOSMesa` "
                     "on Fedora); on a machine with an NVIDIA GPU set MUJOCO_GL=egl instead",
           "egl": "install EGL: `apt-get install libegl1` (needs an NVIDIA driver); on a CPU machine set "
                  "MUJOCO_GL=osmesa (`apt-get install libosmesa6`) instead"}.get(
        backend.lower(), "set MUJOCO_GL=osmesa (CPU, `apt-get install libosmesa6`) or MUJOCO_GL=egl (NVIDIA GPU)")
    raise RuntimeError(f"MuJoCo cannot render offscreen with MUJOCO_GL={backend} on this machine ({err}); "
                       f"it is needed for {needed_for}. To fix: {fix}")


# -----------------------------------------------------------------------------------------------------------
# 2. Meta-World (v3, gymnasium API): adapter, scripted experts, demonstrations, evaluation protocol
# -----------------------------------------------------------------------------------------------------------

# task -> instruction. Every task here has a scripted expert that succeeds on >= 95% of seeds (docs/history.md).
METAWORLD_INSTRUCTIONS = {
    "drawer-open": "open the drawer",
    "drawer-close": "close the drawer",
    "door-open": "open the door",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
    "button-press-topdown": "press the button from the top",
    "button-press": "press the button from the front",
    "handle-press": "press the handle down",
    "coffee-button": "push the button on the coffee machine",
    "faucet-open": "turn the faucet on",
    "faucet-close": "turn the faucet off",
    "lever-pull": "pull the lever up",
    "dial-turn": "turn the dial",
}
DEFAULT_TASKS = ("drawer-open", "door-open", "window-open", "button-press-topdown", "handle-press")
# Held-out instructions (never in the demonstrations): the miniature of the paper's enriched-instruction
# evaluation (§IV-B, GPT-4 paraphrases of CALVIN's instructions). Written for this project; each paraphrase
# keeps the task's meaning and changes the wording. `--instructions paraphrased` picks one per episode seed.
METAWORLD_PARAPHRASES = {
    "drawer-open": ("pull the drawer out", "slide the drawer open toward you", "get the drawer open"),
    "drawer-close": ("push the drawer shut", "slide the drawer back in", "shut the drawer"),
    "door-open": ("swing the door open", "pull the door so it opens", "get the door open"),
    "window-open": ("push the window sideways to open it", "open the sliding window", "move the window pane open"),
    "window-close": ("push the window shut", "close the sliding window", "slide the window pane closed"),
    "button-press-topdown": ("push the button down from above", "press down on the top of the button",
                             "hit the button from above"),
    "button-press": ("push the button from the front side", "press the button head-on", "poke the button forward"),
    "handle-press": ("push the handle downward", "press down on the lever handle", "move the handle down"),
    "coffee-button": ("press the coffee machine's button", "hit the button on the coffee maker",
                      "push the coffee machine button"),
    "faucet-open": ("turn the tap on", "open the faucet", "rotate the faucet handle to start the water"),
    "faucet-close": ("turn the tap off", "close the faucet", "rotate the faucet handle to stop the water"),
    "lever-pull": ("lift the lever", "pull the lever upward", "raise the lever"),
    "dial-turn": ("rotate the dial", "twist the dial", "spin the dial around"),
}
# `--instructions generic`: one instruction that names no task, the same for all of them. A probe, not part of the
# split: whatever a policy still solves with it, it reads off the scene (each task has its own object), not the words.
GENERIC_INSTRUCTION = "do the task"
SCENES = ("seen", "shifted")
INSTRUCTION_SETS = ("seen", "paraphrased", "generic")
# The shifted scene (`--scene shifted`, test time only): the miniature of CALVIN's unseen scene D (new table
# textures and object colours, same robot). Per episode seed: every material recoloured (the floor, table and
# wall textures tinted; the task objects' colours mixed with a random one; the robot, whose geoms carry bare
# colours, is unchanged), each light's brightness and position changed, and both cameras moved a little.
SHIFT_TINT = (0.45, 1.0)  # textured materials (floor, table, wall): rgb multiplied by U(0.45, 1) per channel
SHIFT_MIX = 0.6  # untextured materials (the objects): rgb -> (1 - 0.6) rgb + 0.6 U(0, 1)^3
SHIFT_LIGHT = (0.5, 1.5)  # light diffuse x U(0.5, 1.5) per light (and the headlight), position +- 0.5 m in x, y
SHIFT_CAMERA = {"corner": (0.03, 4.0), "gripperPOV": (0.005, 3.0)}  # camera: (+- metres per axis, +- degrees)
METAWORLD_CAMERAS = {"static": "corner", "wrist": "gripperPOV"}  # names in Meta-World's xyz_base.xml
METAWORLD_CONTROL_HZ = 80  # physics dt 2.5 ms x frame_skip 5 = 12.5 ms per env step (Meta-World's render_fps)
DEMO_SEEDS = (0, 1_000_000)  # demonstration episodes are seeded inside this range ...
EVAL_SEEDS = (1_000_000, 2_000_000)  # ... and evaluation episodes inside this one: they never overlap


def _check_task(task):
    if task not in METAWORLD_INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {task!r}; known tasks (with a reliable scripted expert): "
                         f"{', '.join(METAWORLD_INSTRUCTIONS)}")


def metaworld_to_canonical(a4):
    """Meta-World action (4,) [dx, dy, dz, grip effort, +1 closes] -> canonical (7,) with gripper +1 open."""
    a4 = np.asarray(a4, dtype=np.float32)
    if a4.shape != (4,):
        raise ValueError(f"expected a Meta-World action of shape (4,), got {a4.shape}")
    out = np.zeros(7, dtype=np.float32)
    out[:3] = np.clip(a4[:3], -1, 1)  # Meta-World has no rotation control: dims 3-5 stay 0
    out[6] = 1.0 if a4[3] <= 0 else -1.0  # no effort or opening effort = open
    return out


def canonical_to_metaworld(a7):
    """Canonical action (7,) -> Meta-World (4,). Rotation dims are ignored (Meta-World keeps the hand level)."""
    a7 = np.asarray(a7, dtype=np.float32)
    if a7.shape != (7,):
        raise ValueError(f"expected a canonical action of shape (7,) [dx,dy,dz,droll,dpitch,dyaw,gripper], "
                         f"got {a7.shape}")
    if not np.isfinite(a7).all():
        raise ValueError(f"action contains NaN/inf: {a7}")
    return np.array([*np.clip(a7[:3], -1, 1), -1.0 if a7[6] > 0 else 1.0], dtype=np.float32)


def scripted_expert(task):
    """Meta-World's own hand-written expert policy for `task` (its `get_action(obs39) -> (4,)`)."""
    import warnings
    from metaworld import policies
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")  # the experts' own gains
    name = "Sawyer" + "".join(p.capitalize() for p in task.split("-")) + "V3Policy"
    if not hasattr(policies, name):
        raise ValueError(f"metaworld.policies has no {name} for task {task!r}")
    return getattr(policies, name)()


class MetaWorldEnv:
    """One Meta-World task behind the project's adapter shape.

    reset(seed) places the objects from `seed` (same seed -> same scene) and returns the observation
    {"static": (S,S,3) uint8, "wrist": (S,S,3) uint8, "state": (4,) float32 [hand xyz, gripper opening]};
    step(action7) -> (obs, success). Images come from mujoco.Renderer (rows flipped to the usual top-down
    order); cameras=() skips rendering (for the expert and random baselines, which do not look).
    """

    def __init__(self, task, image_size=64, cameras=("static", "wrist"), max_steps=200, scene="seen",
                 instructions="seen"):
        _check_task(task)
        for c in cameras:
            if c not in METAWORLD_CAMERAS:
                raise ValueError(f"unknown camera {c!r}; Meta-World adapter cameras: {list(METAWORLD_CAMERAS)}")
        if scene not in SCENES or instructions not in INSTRUCTION_SETS:
            raise ValueError(f"scene must be one of {SCENES} and instructions one of {INSTRUCTION_SETS}, got "
                             f"scene={scene!r}, instructions={instructions!r}")
        self.scene, self.instructions = scene, instructions
        _pick_gl_backend()
        import metaworld
        self.task, self.image_size, self.cameras, self.max_steps = task, image_size, tuple(cameras), max_steps
        self.instruction = GENERIC_INSTRUCTION if instructions == "generic" else METAWORLD_INSTRUCTIONS[task]
        self.env = metaworld.ALL_V3_ENVIRONMENTS[f"{task}-v3"]()
        self.env._partially_observable = False  # goal position in the 39-d state (the expert reads it)
        self.env._freeze_rand_vec = False  # new object placement at every reset ...
        self.env.seeded_rand_vec = True  # ... drawn from env.np_random, i.e. from reset(seed)
        self.env._set_task_called = True
        self.env.max_path_length = max_steps + 1  # our own step limit; Meta-World raises past its own
        self.expert = scripted_expert(task)
        self.t, self.raw = 0, None
        self.seen_look = seen_look(self.env.model) if scene == "shifted" else None

    def reset(self, seed):
        if self.seen_look is not None:  # before reset(): its forward pass places the moved cameras and lights
            shift_scene(self.env.model, self.seen_look, seed)
        self.env.seed(int(seed))
        self.raw, _ = self.env.reset()  # (39,) hand, gripper, objects, previous frame, goal
        self.t = 0
        if self.instructions == "paraphrased":
            options = METAWORLD_PARAPHRASES[self.task]
            self.instruction = options[np.random.default_rng([int(seed), 2]).integers(len(options))]
        return self.observe()

    def observe(self):
        obs = {"state": self.raw[:4].astype(np.float32)}
        if self.cameras:
            r = get_renderer(self.env.model, self.image_size)
            for c in self.cameras:
                r.update_scene(self.env.data, camera=METAWORLD_CAMERAS[c])
                obs[c] = np.ascontiguousarray(r.render()[::-1])  # (S, S, 3) uint8, top row first
        return obs

    def expert_action(self):
        """The scripted expert's action for the current state, canonical 7-d."""
        return metaworld_to_canonical(np.clip(self.expert.get_action(self.raw), -1, 1))

    def step(self, action7):
        self.raw, _, _, _, info = self.env.step(canonical_to_metaworld(action7))
        self.t += 1
        return self.observe(), bool(info["success"])

    @property
    def done(self):
        return self.t >= self.max_steps

    def close(self):
        self.env.close()


def seen_look(model):
    """A copy of everything shift_scene changes (so every episode shifts the seen scene, not the last shift)."""
    cams = {name: (model.cam(name).pos.copy(), model.cam(name).quat.copy()) for name in SHIFT_CAMERA}
    return dict(mat_rgba=model.mat_rgba.copy(), light_pos=model.light_pos.copy(),
                light_diffuse=model.light_diffuse.copy(), headlight=model.vis.headlight.diffuse.copy(), cams=cams)


def _small_rotation(rng, max_deg):
    """A unit quaternion (w, x, y, z) rotating by U(-max_deg, max_deg) degrees about a uniformly random axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    half = np.deg2rad(rng.uniform(-max_deg, max_deg)) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * axis])


def shift_scene(model, seen, seed):
    """Recolour, relight and move the cameras of a Meta-World model, deterministically from `seed` (see SHIFT_*).
    Only appearance changes: no geometry, mass or friction, so the task's physics and the expert are untouched."""
    import mujoco
    rng = np.random.default_rng([int(seed), 1])
    textured = model.mat_texid.max(axis=1) >= 0 if model.mat_texid.ndim == 2 else model.mat_texid >= 0
    mat = seen["mat_rgba"].copy()  # (n_mat, 4)
    tint = rng.uniform(*SHIFT_TINT, size=(len(mat), 3))
    mix = (1 - SHIFT_MIX) * mat[:, :3] + SHIFT_MIX * rng.uniform(0, 1, size=(len(mat), 3))
    mat[:, :3] = np.where(textured[:, None], mat[:, :3] * tint, mix)
    model.mat_rgba[:] = mat
    model.light_diffuse[:] = seen["light_diffuse"] * rng.uniform(*SHIFT_LIGHT, size=(len(model.light_diffuse), 1))
    pos = seen["light_pos"].copy()
    pos[:, :2] += rng.uniform(-0.5, 0.5, size=(len(pos), 2))
    model.light_pos[:] = pos
    model.vis.headlight.diffuse[:] = seen["headlight"] * rng.uniform(*SHIFT_LIGHT)
    for name, (dpos, ddeg) in SHIFT_CAMERA.items():
        p0, q0 = seen["cams"][name]
        cam = model.cam(name)
        cam.pos[:] = p0 + rng.uniform(-dpos, dpos, size=3)
        q = np.empty(4)
        mujoco.mju_mulQuat(q, _small_rotation(rng, ddeg), q0)  # rotate the camera frame in its parent's frame
        cam.quat[:] = q


def _rollout(env, seed, act, record=False):
    """One episode: act(obs, env) -> action7 until success or max_steps. Returns (success, frames, actions)."""
    obs, frames, actions, success = env.reset(seed), [], [], False
    while not env.done and not success:
        a = act(obs, env)
        if record:
            frames.append(obs)
            actions.append(a)
        obs, success = env.step(a)
    return success, frames, actions


# --- scripted-expert demonstrations, rendered, cached on disk ---------------------------------------------

_WORKER_ENV = None  # each worker process keeps its current task's env (and so its single renderer)


def _worker_env(task, image_size, cameras, max_steps, scene="seen", instructions="seen"):
    global _WORKER_ENV
    e = _WORKER_ENV
    want = (task, image_size, tuple(cameras), max_steps, scene, instructions)
    if e is None or (e.task, e.image_size, e.cameras, e.max_steps, e.scene, e.instructions) != want:
        if e is not None:
            close_renderer()
            e.close()
        _WORKER_ENV = MetaWorldEnv(*want)
    return _WORKER_ENV


def _demo_episode(job):
    """Worker: roll out the expert for one (task, seed) with rendering. Returns the episode or None on failure.

    noise > 0: the executed xyz action gets Gaussian noise N(0, noise^2) while the recorded label stays the
    expert's clean action for the visited state (DART, Laskey et al. 2017). The demos then also show how
    to recover from small drifts, which closed-loop cloning needs: without it, policies got stuck beside the
    button or the handle they had just missed."""
    task, seed, image_size, cameras, max_steps, noise = job
    env = _worker_env(task, image_size, cameras, max_steps)
    rng = np.random.default_rng(seed)
    obs, frames, labels, ok = env.reset(seed), [], [], False
    while not env.done and not ok:
        a = env.expert_action()  # (7,) the label
        frames.append(obs)
        labels.append(a)
        executed = a.copy()
        executed[:3] += rng.normal(0.0, noise, 3) if noise > 0 else 0.0
        obs, ok = env.step(executed)
    if not ok:
        return task, seed, None
    ep = {c: np.stack([f[c] for f in frames]) for c in cameras}  # (T, S, S, 3) uint8
    return task, seed, {"images": ep, "actions": np.stack(labels),  # (T, 7)
                        "state": np.stack([f["state"] for f in frames])}  # (T, 4)


def demo_paths(tasks, demos_per_task, image_size, seed, cache_dir, cameras=("static", "wrist"), max_steps=200,
               noise=0.0):
    """The cache file for each task; the name encodes everything that changes its content."""
    paths = {}
    for task in tasks:
        key = json.dumps([task, demos_per_task, image_size, seed, list(cameras), max_steps, noise, "v1"])
        h = hashlib.sha1(key.encode()).hexdigest()[:8]
        paths[task] = Path(cache_dir) / f"metaworld_{task}_{demos_per_task}demos_{image_size}px_seed{seed}_{h}.h5"
    return paths


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks; PermissionError means alive (another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale_tmp(path):
    """Delete path's temporary files (path.tmp<pid>) whose writing process is gone: an interrupted run's."""
    for p in path.parent.glob(path.name + ".tmp*"):
        pid = p.name[len(path.name) + 4:]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _complete_demo_file(path, demos):
    """Is the cached file there with its `demos` complete episodes? A damaged one (unreadable, or short of
    episodes, e.g. left by a crashed or racing writer) is renamed to path.bad and rendered again."""
    if not path.exists():
        return False
    import h5py
    try:
        with h5py.File(path, "r") as f:
            n = sum(1 for g in f["episodes"].values() if g.attrs.get("complete", 0))
    except (OSError, KeyError) as e:
        n, why = 0, f"unreadable ({e})"
    else:
        why = f"{n} complete episodes, expected {demos}"
    if n == demos:
        return True
    os.replace(path, path.with_name(path.name + ".bad"))
    print(f"demo cache {path} is damaged: {why}; kept as {path.name}.bad, rendering it again", flush=True)
    return False


def generate_demos(tasks, demos_per_task, image_size=64, seed=0, cache_dir="data_cache", workers=None,
                   cameras=("static", "wrist"), max_steps=200, noise=0.0, progress=True):
    """Scripted-expert demonstrations, one HDF5 file per task (only successful episodes), reused when cached.

    Episode i of a task is seeded from DEMO_SEEDS, never from the evaluation range. Rendering dominates the
    cost (~15 ms per camera frame), so episodes are spread over `workers` processes (default: all cores).
    noise: std of the Gaussian noise added to the executed xyz actions (labels stay clean; see _demo_episode).
    Returns the list of HDF5 paths, in task order.
    """
    from data import EpisodeWriter
    for t in tasks:
        _check_task(t)
    if not 0 <= seed < 100:
        raise ValueError(f"seed must be in [0, 100) so demo seeds stay in {DEMO_SEEDS}, got {seed}")
    paths = demo_paths(tasks, demos_per_task, image_size, seed, cache_dir, cameras, max_steps, noise)
    todo = [t for t in tasks if not _complete_demo_file(paths[t], demos_per_task)]
    if todo:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        workers = workers or min(16, os.cpu_count() or 1)
        attrs = {"control_hz": METAWORLD_CONTROL_HZ, "source": "metaworld scripted expert (metaworld.policies)",
                 "action_convention": "7-d [dx,dy,dz,droll,dpitch,dyaw,gripper]: xyz = Meta-World's hand delta "
                 "in [-1,1] (x 1 cm), rotation always 0, gripper +1 open / -1 closed",
                 "image_size": image_size, "cameras": json.dumps(list(cameras)), "seed": seed,
                 "expert_noise": noise}
        # Each process writes its own temporary file (name + .tmp<pid>): two runs that need the same demos at once
        # (e.g. two sweep processes) both render and the last rename wins, instead of one deleting the other's
        # file under it and renaming an empty one into place. Leftovers of dead processes are removed.
        for t in todo:
            _remove_stale_tmp(paths[t])
        tmp = {t: paths[t].parent / f"{paths[t].name}.tmp{os.getpid()}" for t in todo}
        writers = {t: EpisodeWriter(str(tmp[t]), attrs) for t in todo}
        need, next_i, attempts = {t: demos_per_task for t in todo}, {t: 0 for t in todo}, {t: 0 for t in todo}
        from tqdm import tqdm
        bar = tqdm(total=demos_per_task * len(todo), desc="expert demos", unit="ep", disable=not progress)
        ctx = mp.get_context("spawn")  # fork after torch started its threads can deadlock
        try:
            for w in writers.values():
                w.__enter__()
            with ctx.Pool(workers) as pool:
                while any(need.values()):
                    jobs = []
                    for t in todo:
                        for _ in range(need[t]):
                            jobs.append((t, DEMO_SEEDS[0] + seed * 10_000 + next_i[t], image_size, cameras, max_steps,
                                         noise))
                            next_i[t] += 1
                            attempts[t] += 1
                        if attempts[t] > 3 * demos_per_task + 10:
                            raise RuntimeError(f"the scripted expert for {t} succeeded in only "
                                               f"{demos_per_task - need[t]} of {attempts[t]} episodes within "
                                               f"{max_steps} steps; raise max_steps or pick another task")
                    for t, s, ep in pool.imap(_demo_episode, jobs):  # ordered -> same file for the same seed
                        if ep is not None and need[t] > 0:
                            writers[t].add_episode(ep["images"], ep["actions"], METAWORLD_INSTRUCTIONS[t], t,
                                                   state=ep["state"])
                            need[t] -= 1
                            bar.update(1)
        finally:
            for w in writers.values():
                w.__exit__(None, None, None)
            bar.close()
        for t in todo:
            os.replace(tmp[t], paths[t])  # only complete files get the final name
    return [str(paths[t]) for t in tasks]


# --- closed-loop evaluation ---------------------------------------------------------------------------------

def eval_seeds(seed, episodes):
    if not 0 <= seed < 1000 or episodes > 1000:
        raise ValueError(f"need 0 <= seed < 1000 and episodes <= 1000, got seed={seed} episodes={episodes}")
    return [EVAL_SEEDS[0] + seed * 1000 + i for i in range(episodes)]


def random_action(rng):
    a = np.zeros(7, dtype=np.float32)
    a[:3] = rng.uniform(-1, 1, 3)
    a[6] = rng.choice([-1.0, 1.0])
    return a


def baseline_success(task, seeds, kind, max_steps=200):
    """Success rate of the scripted expert ("expert") or uniform random actions ("random") on `seeds`.
    Neither looks at images, so nothing is rendered."""
    env, wins = MetaWorldEnv(task, cameras=(), max_steps=max_steps), 0
    for s in seeds:
        rng = np.random.default_rng(s)
        act = (lambda o, e: e.expert_action()) if kind == "expert" else (lambda o, e: random_action(rng))
        wins += _rollout(env, s, act)[0]
    env.close()
    return wins / len(seeds)


def _baseline_job(job):
    task, seeds, kind, max_steps = job
    return task, kind, baseline_success(task, seeds, kind, max_steps)


def baseline_columns(tasks, seeds, max_steps=200, cache_dir=None, pool=None):
    """{task: {"expert": rate, "random": rate}} on `seeds`. Neither column depends on the policy, so with
    `cache_dir` they are kept per (task, seeds, max_steps) in one JSON file there and only missing tasks are
    rolled out; `pool` (a multiprocessing pool) runs those rollouts in parallel."""
    path, cached = None, {}
    if cache_dir is not None:
        key = json.dumps([list(seeds), max_steps, "v1"])
        path = Path(cache_dir) / f"metaworld_baselines_{hashlib.sha1(key.encode()).hexdigest()[:8]}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
    jobs = [(t, list(seeds), k, max_steps) for t in tasks if t not in cached for k in ("expert", "random")]
    out = pool.imap(_baseline_job, jobs) if pool is not None and jobs else map(_baseline_job, jobs)
    for task, kind, rate in out:
        cached.setdefault(task, {})[kind] = rate
    if path is not None and jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, cached)
    return {t: cached[t] for t in tasks}


_WORKER_POLICY = None  # (key, Policy) loaded once per evaluation worker process


def _eval_episode(job):
    """One closed-loop episode. In a worker, `policy` is (run_dir, execution) and is loaded once per process."""
    policy, task, seed, image_size, cameras, max_steps, record, scene, instructions = job
    if isinstance(policy, tuple):
        global _WORKER_POLICY
        if _WORKER_POLICY is None or _WORKER_POLICY[0] != policy:
            import torch
            from vla import Policy
            torch.set_num_threads(1)  # one core per worker process
            _WORKER_POLICY = (policy, Policy.from_pretrained(policy[0], execution=policy[1]))
        policy = _WORKER_POLICY[1]
    env = _worker_env(task, image_size, cameras, max_steps, scene, instructions)
    policy.reset()
    ok, frames, _ = _rollout(env, seed, lambda o, e: policy.act(o, e.instruction), record=record)
    return task, seed, ok, env.t, frames, env.instruction


def evaluate_metaworld(policy, tasks=DEFAULT_TASKS, episodes=10, seed=0, image_size=64, cameras=("static", "wrist"),
                       max_steps=200, gif_dir=None, baselines=True, progress=True, workers=1, execution="chunk",
                       scene="seen", instructions="seen", cache_dir=None):
    """Closed-loop success of `policy` on each task: the Meta-World protocol of this project.

    policy: an object with reset() / act(obs, instruction) -> action7, or a run directory (str/Path), loaded
    as vla.Policy with `execution`; only a run directory can be spread over `workers` processes (rendering
    is single-threaded, so 2 processes on 2 cores nearly halve the time).
    Every task is run on the same evaluation seeds (disjoint from the demonstration seeds), and the scripted
    expert (the ceiling) and a random policy (the floor) are run on those seeds too (without rendering).
    With gif_dir, the first episode of each task is saved as <gif_dir>/<task>.gif.
    scene="shifted" / instructions="paraphrased": the generalization split (test time only; see SHIFT_* and
    METAWORLD_PARAPHRASES), deterministic per episode seed. The expert and random columns stay on the seen
    scene (neither looks at images or instructions, and appearance does not change the physics).
    cache_dir: keep the expert and random columns there per evaluation seed (baseline_columns); with workers > 1
    they are rolled out in the same pool as the episodes.
    Returns {task: {"instruction", "policy", "expert", "random", "steps"}} (success rates in [0, 1]).
    """
    from tqdm import tqdm
    for t in tasks:
        _check_task(t)
    seeds = eval_seeds(seed, episodes)
    if isinstance(policy, (str, Path)):
        policy = (str(policy), execution)
    elif workers > 1:
        raise ValueError("workers > 1 needs the policy as a run directory (each process loads its own copy)")
    if scene not in SCENES or instructions not in INSTRUCTION_SETS:
        raise ValueError(f"scene must be one of {SCENES} and instructions one of {INSTRUCTION_SETS}, got "
                         f"scene={scene!r}, instructions={instructions!r}")
    jobs = [(policy, t, s, image_size, tuple(cameras), max_steps, gif_dir is not None and i == 0, scene, instructions)
            for t in tasks for i, s in enumerate(seeds)]
    rank, world = rank_world()  # under torchrun each rank runs every world-th episode; merged below
    jobs = jobs[rank::world]
    wins, steps = {t: 0 for t in tasks}, {t: [] for t in tasks}
    bar = tqdm(total=len(jobs), desc="closed-loop eval", unit="ep", disable=not progress)

    def collect(out):
        task, s, ok, n, frames, said = out
        wins[task] += ok
        steps[task].append(n)
        if frames:
            save_gif(frames, Path(gif_dir) / f"{task}.gif", cameras, caption=f"{said}: {'success' if ok else 'failure'}")
        bar.update(1)
        bar.set_postfix(task=task, success=f"{wins[task]}/{len(steps[task])}")
    mine = [task for k, task in enumerate(tasks) if baselines and k % world == rank]  # this rank's baselines
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for out in pool.imap(_eval_episode, jobs):
                collect(out)
            base = baseline_columns(mine, seeds, max_steps, cache_dir, pool)
    else:
        for job in jobs:
            collect(_eval_episode(job))
        close_renderer()
        base = baseline_columns(mine, seeds, max_steps, cache_dir)
    bar.close()
    if world > 1:  # merge every rank's episodes and baselines; all ranks return the full results
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, (wins, steps, base))
        wins = {t: sum(p[0][t] for p in parts) for t in tasks}
        steps = {t: [n for p in parts for n in p[1][t]] for t in tasks}
        base = {t: b for p in parts for t, b in p[2].items()}
    results = {}
    for task in tasks:
        results[task] = {"instruction": METAWORLD_INSTRUCTIONS[task], "policy": wins[task] / len(seeds),
                         "steps": float(np.mean(steps[task])), **base.get(task, {})}
    return results


# -----------------------------------------------------------------------------------------------------------
# 3. Results tables and rollout GIFs (shared by all benchmarks)
# -----------------------------------------------------------------------------------------------------------

def results_table(results, title="closed-loop success"):
    """Markdown table: one row per task (policy, scripted expert, random on the same seeds) and the mean."""
    cols = [c for c in ("policy", "expert", "random") if any(c in r for r in results.values())]
    names = {"policy": "VLA", "expert": "scripted expert", "random": "random"}
    lines = [f"| task | instruction | {' | '.join(names[c] for c in cols)} |",
             "|---|---|" + "---:|" * len(cols)]
    for task, r in results.items():
        lines.append(f"| {task} | {r.get('instruction', '')} | "
                     + " | ".join(f"{100 * r[c]:.0f}%" if c in r else "-" for c in cols) + " |")
    means = [np.mean([r[c] for r in results.values() if c in r]) for c in cols]
    lines.append("| **mean** | | " + " | ".join(f"**{100 * m:.1f}%**" for m in means) + " |")
    return f"### {title}\n\n" + "\n".join(lines) + "\n"


def write_results(run_dir, results, header=""):
    """Write <run_dir>/results.md (a markdown table) and results.json (the raw numbers)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = (header + "\n\n" if header else "") + results_table(results)
    (run_dir / "results.md").write_text(text)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return text


def save_gif(frames, path, cameras=("static", "wrist"), scale=2, every=2, caption=""):
    """frames: list of observation dicts -> an animated GIF with the cameras side by side, scaled up."""
    from PIL import Image, ImageDraw
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for f in frames[::every]:
        row = np.concatenate([f[c] for c in cameras if c in f], axis=1)  # (S, V*S, 3)
        im = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        if caption:
            ImageDraw.Draw(im).text((3, 2), caption, fill=(255, 255, 255))
        images.append(im)
    if images:
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 * every // 30, loop=0)
    return path


# -----------------------------------------------------------------------------------------------------------
# 4. CALVIN: adapter and the official long-horizon protocol (the paper's Extended Table 2)
# -----------------------------------------------------------------------------------------------------------
# Needs calvin_env (git clone --recurse-submodules https://github.com/mees/calvin; not on PyPI) and a CALVIN
# split (its validation/ folder holds the env config). Everything else is pure Python, so the protocol itself
# (chains, resets, step limits, metrics, sharding) is tested against a test double (tests/fakes/calvin_env).

CALVIN_EP_LEN = 360  # control steps per subtask (official EP_LEN: 12 s at 30 Hz)
CALVIN_NUM_SEQUENCES = 1000  # official NUM_SEQUENCES: 1000 chains of 5 subtasks
_COLORS = ("red", "blue", "pink")
_SLIDER = ("slider_right", "slider_left")


def _calvin_task_table():
    """The 34 tasks in the official order: name -> (category, symbolic branches, oracle predicate, instruction).

    Branches are (condition, effect) pairs over the symbolic state used to draw the evaluation chains; a
    condition value that is a tuple means "any of". No two tasks of one category may share a chain. The oracle
    predicate is the argument list of calvin_env's Tasks (conf/tasks/new_playtable_tasks.yaml) and the
    instruction is the single string per task of calvin_models/conf/annotations/new_playtable_validation.yaml.
    """
    t = {}
    for verb, cat, pred in (("rotate", 1, "rotate_object"), ("push", 1, "push_object")):
        for c in _COLORS:
            for side in ("right", "left"):
                b = f"{c}_block"
                sign = 1 if side == "left" else -1  # rotate: +60 deg is left; push: -0.1 m in x is left
                args = [pred, f"block_{c}", 60 * sign] if verb == "rotate" else [pred, f"block_{c}", -0.1 * sign, 0]
                text = (f"take the {c} block and rotate it to the {side}" if verb == "rotate"
                        else f"go push the {c} block {side}")
                t[f"{verb}_{c}_block_{side}"] = (cat, [({b: "table", "grasped": 0}, {b: "table"})], args, text)
    t["move_slider_left"] = (2, [({"slider": "right", "grasped": 0}, {"slider": "left"})],
                             ["move_door_rel", "base__slide", 0.15], "push the sliding door to the left side")
    t["move_slider_right"] = (2, [({"slider": "left", "grasped": 0}, {"slider": "right"})],
                              ["move_door_rel", "base__slide", -0.15], "push the sliding door to the right side")
    t["open_drawer"] = (3, [({"drawer": "closed", "grasped": 0}, {"drawer": "open"})],
                        ["move_door_rel", "base__drawer", 0.12], "pull the handle to open the drawer")
    t["close_drawer"] = (3, [({"drawer": "open", "grasped": 0}, {"drawer": "closed"})],
                         ["move_door_rel", "base__drawer", -0.12], "push the handle to close the drawer")
    for c in _COLORS:
        b, held = f"{c}_block", {f"{c}_block": "grasped", "grasped": 1}
        t[f"lift_{c}_block_table"] = (4, [({b: "table", "grasped": 0}, held)],
                                      ["lift_object", f"block_{c}", 0.05, "table", "base_link"],
                                      f"grasp and lift the {c} block")
        t[f"lift_{c}_block_slider"] = (5, [({b: "slider_left", "slider": "right", "grasped": 0}, held),
                                           ({b: "slider_right", "slider": "left", "grasped": 0}, held)],
                                       ["lift_object", f"block_{c}", 0.03, "table", "plank_link"],
                                       f"lift the {c} block from the sliding cabinet")
        t[f"lift_{c}_block_drawer"] = (6, [({b: "drawer", "drawer": "open", "grasped": 0}, held)],
                                       ["lift_object", f"block_{c}", 0.05, "table", "drawer_link"],
                                       f"Take the {c} block from the drawer")
    t["place_in_slider"] = (7, [({f"{c}_block": "grasped", "slider": s, "grasped": 1},
                                 {f"{c}_block": f"slider_{s}", "grasped": 0})
                                for c in _COLORS for s in ("right", "left")],
                            ["place_object", "table", "plank_link"], "store the grasped block in the sliding cabinet")
    t["place_in_drawer"] = (7, [({f"{c}_block": "grasped", "drawer": "open", "grasped": 1},
                                 {f"{c}_block": "drawer", "grasped": 0}) for c in _COLORS],
                            ["place_object", "table", "drawer_link"], "store the grasped block in the drawer")
    pairs = [(a, b) for a in _COLORS for b in _COLORS if a != b]
    t["stack_block"] = (10, [({f"{a}_block": "grasped", f"{b}_block": "table", "grasped": 1},
                              {f"{a}_block": "stacked_top", f"{b}_block": "stacked_bottom", "grasped": 0})
                             for a, b in pairs], ["stack_objects"], "stack the grasped block")
    t["unstack_block"] = (11, [({f"{a}_block": "stacked_top", f"{b}_block": "stacked_bottom", "grasped": 0},
                                {f"{a}_block": "table", f"{b}_block": "table"}) for a, b in pairs],
                          ["unstack_objects"], "remove the stacked block")
    for light, key, how in (("lightbulb", "lightbulb", "use the switch to turn {} the light bulb"),
                            ("led", "led", "press the button to turn {} the led light")):
        t[f"turn_on_{light}"] = (8, [({key: 0, "grasped": 0}, {key: 1})], ["toggle_light", light, 0, 1],
                                 how.format("on"))
        t[f"turn_off_{light}"] = (8, [({key: 1, "grasped": 0}, {key: 0})], ["toggle_light", light, 1, 0],
                                  how.format("off"))
    t["push_into_drawer"] = (9, [({f"{c}_block": "table", **{f"{o}_block": _SLIDER for o in _COLORS if o != c},
                                   "drawer": "open", "grasped": 0}, {f"{c}_block": "drawer", "grasped": 0})
                                  for c in _COLORS],
                             ["push_object_into", [f"block_{c}" for c in _COLORS], "table", "base_link", "table",
                              "drawer_link"], "slide the block that it falls into the drawer")
    return t


CALVIN_TASKS = _calvin_task_table()
CALVIN_INSTRUCTIONS = {name: v[3] for name, v in CALVIN_TASKS.items()}  # first validation instruction per task


def fnv1_32(text):
    """pyhash.fnv1_32()(text) without pyhash (which no longer builds on Python 3.11): FNV-1 32-bit (multiply by
    the FNV prime, then xor the byte) with initial value 0, over the UTF-16-LE bytes of a str (bytes as is)."""
    data = text.encode("utf-16-le") if isinstance(text, str) else bytes(text)
    h = 0
    for byte in data:
        h = ((h * 16777619) & 0xFFFFFFFF) ^ byte
    return h


def calvin_initial_states():
    """The 192 symbolic start states of the evaluation: 1-2 blocks on the table, at most one per slider side."""
    space = {"led": [0, 1], "lightbulb": [0, 1], "slider": ["right", "left"], "drawer": ["closed", "open"],
             "red_block": ["table", *_SLIDER], "blue_block": ["table", *_SLIDER],
             "pink_block": ["table", *_SLIDER], "grasped": [0]}  # key order matters: it is hashed below
    states = []
    for values in itertools.product(*space.values()):
        blocks = values[4:7]
        if blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2:
            states.append(dict(zip(space, values)))
    return states


def calvin_chain_is_valid(state, chain):
    """True when every task of the chain has exactly one applicable branch in turn and categories differ."""
    for name in chain:
        nxt = [{**state, **effect} for cond, effect in CALVIN_TASKS[name][1]
               if all(state[k] in v if isinstance(v, tuple) else state[k] == v for k, v in cond.items())]
        if len(nxt) != 1:
            return False
        state = nxt[0]
    return len({CALVIN_TASKS[n][0] for n in chain}) == len(chain)


def calvin_state_chains(i, state, n):
    """The n chains the official generator draws for start state number i (its worker seeds numpy with i)."""
    names = list(CALVIN_TASKS)
    category = np.array([CALVIN_TASKS[n][0] for n in names])
    rng, chains = np.random.RandomState(i), []
    while len(chains) < n:
        idx = rng.permutation(len(names))[:5]  # = legacy rng.choice(names, 5, replace=False), same stream
        if len(set(category[idx].tolist())) == 5:  # cheap pre-filter, part of the validity rule anyway
            chain = tuple(names[j] for j in idx)
            if calvin_chain_is_valid(state, chain):
                chains.append(chain)
    return chains


@functools.lru_cache(maxsize=4)
def _calvin_sequences(num_sequences):
    states = calvin_initial_states()
    counts = [len(c) for c in np.array_split(np.arange(num_sequences), len(states))]  # 40 x 6, then 5 each
    out = [(s, chain) for i, (s, n) in enumerate(zip(states, counts)) for chain in calvin_state_chains(i, s, n)]
    np.random.RandomState(0).shuffle(out)  # the official final shuffle under seed 0
    return tuple(out)


def calvin_sequences(num_sequences=CALVIN_NUM_SEQUENCES):
    """The official evaluation set, identical to calvin_agent.evaluation.multistep_sequences.get_sequences
    (and RoboVLMs' shipped eval_sequences.json): a list of (initial_state dict, (5 task names)).
    ~30 s of CPU (7 M random draws); cached per process."""
    return [(dict(s), chain) for s, chain in _calvin_sequences(int(num_sequences))]


def load_calvin_sequences(path):
    """An eval_sequences.json file (list of [initial_state, [5 task names]]) -> list of (dict, tuple)."""
    seqs = json.loads(Path(path).read_text())
    out = []
    for i, item in enumerate(seqs):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], dict)):
            raise ValueError(f"{path}: entry {i} should be [initial_state_dict, [task, ...]], got {str(item)[:80]}")
        unknown = [t for t in item[1] if t not in CALVIN_TASKS]
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown CALVIN task(s) {unknown}")
        out.append((item[0], tuple(item[1])))
    return out


# calvin_agent.evaluation.utils.get_env_state_for_initial_condition: a fixed neutral arm pose, then the scene
CALVIN_NEUTRAL_ROBOT_OBS = (0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                            -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928,
                            1.0)  # tcp xyz (m), tcp euler (rad), gripper width (m), 7 joints (rad), gripper action
_BLOCK_SLIDER = {"slider_left": (-2.40851662e-01, 9.24044687e-02, 4.60990009e-01),
                 "slider_right": (7.03416330e-02, 9.24044687e-02, 4.60990009e-01)}
_BLOCK_TABLE = ((5.00000896e-02, -1.20000177e-01, 4.59990009e-01), (2.29995412e-01, -1.19995140e-01, 4.59990010e-01))


def calvin_env_state(initial_state):
    """Symbolic start state -> (robot_obs (15,), scene_obs (24,)) exactly as the official evaluator: the table
    slots are shuffled and the three block yaws drawn from numpy seeded by fnv1_32(str(state.values()))."""
    rng = np.random.RandomState(fnv1_32(str(initial_state.values())))
    table = [np.array(p) for p in _BLOCK_TABLE]
    rng.shuffle(table)
    scene = np.zeros(24)
    scene[0] = 0.28 if initial_state["slider"] == "left" else 0.0  # sliding door joint
    scene[1] = 0.22 if initial_state["drawer"] == "open" else 0.0  # drawer joint
    scene[3] = 0.088 if initial_state["lightbulb"] == 1 else 0.0  # switch joint
    scene[4], scene[5] = initial_state["lightbulb"], initial_state["led"]
    yaw_range = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
    for k, color in enumerate(_COLORS):  # red 6:12, blue 12:18, pink 18:24 = xyz, euler xyz
        where = initial_state[f"{color}_block"]
        if where in _BLOCK_SLIDER:
            pos = _BLOCK_SLIDER[where]
        elif color == "red":
            pos = table[0]
        elif color == "blue":
            pos = table[1] if initial_state["red_block"] == "table" else table[0]
        else:
            pos = table[1]
        scene[6 + 6 * k: 9 + 6 * k] = pos
        scene[11 + 6 * k] = rng.uniform(*yaw_range)
    return np.array(CALVIN_NEUTRAL_ROBOT_OBS), scene


def calvin_obs(raw):
    """calvin_env observation -> {"static": (200,200,3) uint8, "wrist": (84,84,3) uint8, "state": (15,) float32}."""
    try:
        rgb = raw["rgb_obs"]
        return {"static": np.asarray(rgb["rgb_static"], dtype=np.uint8),
                "wrist": np.asarray(rgb["rgb_gripper"], dtype=np.uint8),
                "state": np.asarray(raw["robot_obs"], dtype=np.float32)}
    except KeyError as e:
        raise KeyError(f"CALVIN observation lacks {e}; expected obs['rgb_obs']['rgb_static'/'rgb_gripper'] and "
                       f"obs['robot_obs'] (was the env built with obs_space dropping those cameras?)") from e


def calvin_action(a7):
    """Canonical action (7,) -> what calvin_env.step expects: a fresh float64 (7,) relative action (the pinned
    calvin_env scales its argument in place) with the gripper exactly -1 or +1 (it asserts that)."""
    a = np.array(a7, dtype=np.float64).reshape(-1)  # always a copy
    if a.shape != (7,) or not np.isfinite(a).all():
        raise ValueError(f"expected a finite action of shape (7,) [dx,dy,dz,droll,dpitch,dyaw,gripper], got {a}")
    a[6] = 1.0 if a[6] > 0 else -1.0
    return a


def calvin_oracle_spec():
    """{task: [predicate, *args]}: the argument of calvin_env.envs.tasks.Tasks (new_playtable_tasks.yaml)."""
    return {name: list(v[2]) for name, v in CALVIN_TASKS.items()}


def _import_calvin_env():
    try:
        from calvin_env.envs.play_table_env import get_env
        from calvin_env.envs.tasks import Tasks
    except ImportError as e:
        raise ImportError(
            f"CALVIN evaluation needs calvin_env ({e}). It is not on PyPI: `git clone --recurse-submodules "
            "https://github.com/mees/calvin && pip install -e calvin/calvin_env/tacto -e calvin/calvin_env` "
            "(it must stay a git checkout); see docs/calvin_simpler.md.") from e
    return get_env, Tasks


def make_calvin(root):
    """(env, task_oracle) for a CALVIN split at `root`: the env of root/validation without the tactile camera."""
    get_env, Tasks = _import_calvin_env()
    val = Path(root) / "validation"
    if not (val / ".hydra" / "merged_config.yaml").exists():
        raise FileNotFoundError(f"{val}/.hydra/merged_config.yaml not found: --calvin-root must be a CALVIN split "
                                "directory (e.g. task_ABCD_D) that contains training/ and validation/")
    env = get_env(val, obs_space={"rgb_obs": ["rgb_static", "rgb_gripper"], "depth_obs": []}, show_gui=False)
    return env, Tasks(calvin_oracle_spec())


def calvin_rollout(env, policy, oracle, subtask, instruction, ep_len=CALVIN_EP_LEN):
    """One subtask from wherever the previous one left the scene: the policy's history is reset, and success
    is judged against this subtask's own start info. Returns (success, steps used)."""
    obs = env.get_obs()
    policy.reset()
    start_info = env.get_info()
    for t in range(1, ep_len + 1):
        obs, _, _, info = env.step(calvin_action(policy.act(calvin_obs(obs), instruction)))
        if oracle.get_task_info_for_set(start_info, info, {subtask}):
            return True, t
    return False, ep_len


def calvin_run_sequence(env, policy, oracle, initial_state, chain, instructions, ep_len=CALVIN_EP_LEN):
    """One chain: one env reset to the start state, then subtasks until the first failure.
    Returns the number of consecutive successes (0..5) and the steps each attempted subtask used."""
    robot_obs, scene_obs = calvin_env_state(initial_state)
    env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    steps = []
    for subtask, text in zip(chain, instructions):
        ok, n = calvin_rollout(env, policy, oracle, subtask, text, ep_len)
        steps.append(n)
        if not ok:
            return len(steps) - 1, steps
    return len(steps), steps


def calvin_summary(records):
    """Per-sequence records -> the official metrics: chain_sr[i] = share of chains with >= i successes,
    avg_seq_len (the paper's Avg. Len.), and per-task success / attempts."""
    results = [r["result"] for r in records]
    if not results:
        raise ValueError("no CALVIN sequences were evaluated")
    info = {}
    for r in records:
        for k, task in enumerate(r["subtasks"][:r["result"] + 1]):
            d = info.setdefault(task, {"success": 0, "total": 0})
            d["total"] += 1
            d["success"] += k < r["result"]
    return {"num_sequences": len(results), "avg_seq_len": float(np.mean(results)),
            "chain_sr": {i: sum(x >= i for x in results) / len(results) for i in range(1, 6)},
            "task_info": dict(sorted(info.items()))}


def calvin_table(summary, method="RoboVLMs (this run)", train=""):
    """Markdown in the layout of the paper's Extended Table 2, plus per-task rates (Supplementary Table 3)."""
    sr = summary["chain_sr"]
    lines = ["| Method | Train | 1 | 2 | 3 | 4 | 5 | Avg. Len. |", "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| {method} | {train} | " + " | ".join(f"{sr[i]:.3f}" for i in range(1, 6))
             + f" | {summary['avg_seq_len']:.2f} |", "", "| Task Name | success rate | success / attempts |",
             "|---|---:|---:|"]
    for task, d in summary["task_info"].items():
        lines.append(f"| {task.replace('_', ' ')} | {d['success'] / d['total']:.3f} | {d['success']} / {d['total']} |")
    return (f"### CALVIN long-horizon evaluation ({summary['num_sequences']} chains of 5 subtasks)\n\n"
            + "\n".join(lines) + "\n")


# ---- torchrun: the one process-group setup and teardown of both entry points (this file and train.py) ----

def rank_world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return 0, 1


def init_distributed(device="cpu"):
    """Under torchrun (WORLD_SIZE > 1) join the process group once -> (rank, world, torch.device).

    device: a --device flag, "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:i". Under torchrun each
    process takes its own GPU (LOCAL_RANK); the group runs nccl on GPUs and gloo on CPUs, so every multi-process
    path is testable on a laptop. evaluate.py passes "cpu": its group only gathers small Python objects."""
    import torch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda and world > 1 else
                       ("cuda" if cuda else "cpu") if device == "auto" else device)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (*rank_world(), dev)


def end_distributed():
    """Leave the process group before exiting: gloo's threads still running at interpreter exit abort the
    process ("terminate called without an active exception", SIGABRT, see docs/history.md)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def merge_calvin_results(paths):
    """Per-rank record files (calvin_rank<r>.json) -> one list sorted by sequence index; duplicates are an error."""
    records = [r for p in paths for r in json.loads(Path(p).read_text())]
    index = [r["index"] for r in records]
    if len(set(index)) != len(index):
        raise ValueError(f"the rank files {list(map(str, paths))} overlap: were they written by different runs?")
    return sorted(records, key=lambda r: r["index"])


def evaluate_calvin(policy, env, oracle, sequences=None, instructions=None, out_dir=None, rank=None, world_size=None,
                    ep_len=CALVIN_EP_LEN, progress=True):
    """The official long-horizon protocol on `sequences` (default: the official 1000 chains).

    instructions: None -> the first validation instruction of each task; a {task: text} dict; or a list with
    5 texts per sequence (the paper's novel-instruction variant). Sequences are sharded over ranks as the
    official code does (sequences[rank::world_size]); under torch.distributed the records are gathered and
    every rank returns the same merged summary. With out_dir, each rank keeps calvin_rank<r>.json up to date
    (one record per chain: index, initial state, subtasks, instructions, result, steps) and rank 0 writes
    calvin_sequences.json (all records), calvin_results.json (official keys) and calvin_results.md.
    """
    from tqdm import tqdm
    sequences = calvin_sequences() if sequences is None else list(sequences)
    r0, w0 = rank_world()
    rank, world_size = (r0 if rank is None else rank), (w0 if world_size is None else world_size)
    if isinstance(instructions, (list, tuple)) and len(instructions) < len(sequences):
        raise ValueError(f"{len(instructions)} instruction lists for {len(sequences)} sequences")
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    mine = range(rank, len(sequences), world_size)
    bar = tqdm(mine, desc=f"CALVIN rank {rank}", unit="chain", disable=not progress)
    for i in bar:
        state, chain = sequences[i]
        if isinstance(instructions, (list, tuple)):
            texts = list(instructions[i])
        else:
            texts = [(instructions or CALVIN_INSTRUCTIONS)[t] for t in chain]
        result, steps = calvin_run_sequence(env, policy, oracle, state, chain, texts, ep_len)
        records.append({"index": i, "initial_state": state, "subtasks": list(chain), "instructions": texts,
                        "result": result, "steps": steps})
        if out_dir:
            _write_json(out_dir / f"calvin_rank{rank}.json", records)
        bar.set_postfix(avg_len=f"{np.mean([r['result'] for r in records]):.2f}")
    if world_size > 1 and rank_world()[1] == world_size:
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    if len(records) == len(sequences) and out_dir and rank == 0:
        write_calvin_results(out_dir, records)
    return calvin_summary(records)  # partial (this rank only) when sharded by hand: merge_calvin_results


def write_calvin_results(out_dir, records):
    """calvin_sequences.json (every chain), calvin_results.json (official keys) and calvin_results.md."""
    summary = calvin_summary(records)
    _write_json(Path(out_dir) / "calvin_sequences.json", records)
    _write_json(Path(out_dir) / "calvin_results.json", summary)
    (Path(out_dir) / "calvin_results.md").write_text(calvin_table(summary))
    return summary


def load_calvin_instructions(path, sequences, novel=False, seed=123):
    """Instructions for `sequences` from a file (default without a file: CALVIN_INSTRUCTIONS).
    - a JSON list with 5 texts per sequence (RoboVLMs/RoboFlamingo lang_annotation_cache.json): used as is;
    - a YAML/JSON {task: [texts, ...]}: the first text per task (as the official evaluator), or, with
      novel=True, one text drawn per subtask with random.Random(seed) in sequence order over the official
      sequence list (how RoboFlamingo generated its novel-instruction cache from enrich_lang_annotations.json).
    """
    import random
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import yaml  # PyYAML comes with calvin_env's hydra/omegaconf
        data = yaml.safe_load(text)
    if isinstance(data, list):
        return [list(x) for x in data[:len(sequences)]]
    missing = sorted({t for _, chain in sequences for t in chain} - set(data))
    if missing:
        raise KeyError(f"{path} has no instruction for task(s) {missing}")
    if not novel:
        return {t: (v[0] if isinstance(v, list) else v) for t, v in data.items()}
    rng = random.Random(seed)
    full = calvin_sequences() if len(sequences) <= CALVIN_NUM_SEQUENCES else sequences
    drawn = [[rng.choice(data[t]) for t in chain] for _, chain in full]
    if [c for _, c in full[:len(sequences)]] != [tuple(c) for _, c in sequences]:
        raise ValueError("novel instructions are drawn over the official sequence order; pass no "
                         "--calvin-sequences file, or give a per-sequence JSON list instead")
    return drawn[:len(sequences)]


# -----------------------------------------------------------------------------------------------------------
# 5. SimplerEnv: adapter and the visual-matching protocol of the paper's Extended Table 3
# -----------------------------------------------------------------------------------------------------------
# Needs SimplerEnv + ManiSkill2_real2sim (git clones, not on PyPI; SAPIEN 2.2.2 with a Vulkan GPU, Python
# 3.10/3.11, numpy<2). The episode grids below are those of SimplerEnv's scripts/*_visual_matching.sh and
# bridge.sh, which RoboVLMs ran; the action conversion is RoboVLMs' eval/simpler model wrapper.

SIMPLER_STATS_KEYS = {"google_robot": "fractal20220817_data", "widowx": "bridge_orig"}  # official unnorm keys
SIMPLER_URDFS = (None, "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")  # robot recolourings swept in visual matching
# drawer scenes: robot base pose (x, y, yaw) per real-image overlay open_drawer_<name>.png
SIMPLER_DRAWER_POSES = {"a0": (0.644, -0.179, -0.03), "a1": (0.765, -0.182, -0.02), "a2": (0.889, -0.203, -0.06),
                        "b0": (0.652, 0.009, 0.0), "b1": (0.752, 0.009, 0.0), "b2": (0.851, 0.035, 0.0),
                        "c0": (0.665, 0.224, 0.0), "c1": (0.765, 0.222, -0.025), "c2": (0.865, 0.222, -0.025)}
SIMPLER_TASKS = ("google_pick_coke_can_horizontal", "google_pick_coke_can_vertical", "google_pick_coke_can_standing",
                 "google_move_near", "google_open_drawer", "google_close_drawer", "google_place_apple_in_drawer",
                 "widowx_spoon_on_towel", "widowx_carrot_on_plate", "widowx_stack_block", "widowx_eggplant_in_basket")
SIMPLER_STICKY_REPEAT = 2  # Google: a gripper change is repeated for 2 steps (RoboVLMs; Octo's wrapper uses 15)
SIMPLER_OPEN_DELAY = 2  # WidowX: "open" is sent only from the 2nd consecutive open prediction (late_close_gripper)


def _grid(lo, hi, n):
    return [float(v) for v in np.linspace(lo, hi, n)]


def simpler_episodes(task):
    """The visual-matching episodes of one task: a list of dicts (env id, robot, scene, overlay image, horizon,
    robot base pose, object placement, extra env kwargs)."""
    google = {"robot": "google_robot_static", "control_freq": 3, "sim_freq": 513}
    bridge = {"robot": "widowx", "control_freq": 5, "sim_freq": 500, "scene_name": "bridge_table_1_v1",
              "overlay": "bridge_real_eval_1.png", "robot_xy": (0.147, 0.028), "robot_yaw": 0.0,
              "max_episode_steps": 60, "build": {}}
    drawer_kw = {"shader_dir": "rt", "station_name": "mk_station_recolor", "light_mode": "simple",
                 "disable_bad_material": True}  # ray tracing: policies rely on shadows for drawers
    eps = []
    if task.startswith("google_pick_coke_can_"):  # 4 URDFs x 5 x 5 can positions = 100 per orientation
        option = {"horizontal": "lr_switch", "vertical": "laid_vertically", "standing": "upright"}[task.split("_")[-1]]
        for urdf in SIMPLER_URDFS:
            for x in _grid(-0.35, -0.12, 5):
                for y in _grid(-0.02, 0.42, 5):
                    eps.append(dict(google, env_name="GraspSingleOpenedCokeCanInScene-v0", max_episode_steps=80,
                                    scene_name="google_pick_coke_can_1_v4", overlay="google_coke_can_real_eval_1.png",
                                    robot_xy=(0.35, 0.20), robot_yaw=0.0, obj={"init_xy": [x, y]},
                                    build={option: True, "urdf_version": urdf}))
    elif task == "google_move_near":  # 4 URDFs x 60 object layouts = 240
        for urdf in SIMPLER_URDFS:
            for k in range(60):
                eps.append(dict(google, env_name="MoveNearGoogleBakedTexInScene-v0", max_episode_steps=80,
                                scene_name="google_pick_coke_can_1_v4", overlay="google_move_near_real_eval_1.png",
                                robot_xy=(0.35, 0.21), robot_yaw=-0.09, obj={"episode_id": k},
                                build={"urdf_version": urdf}))
    elif task in ("google_open_drawer", "google_close_drawer"):  # 3 drawers x 9 poses x 4 URDFs = 108
        verb = "Open" if task == "google_open_drawer" else "Close"
        for drawer in ("Top", "Middle", "Bottom"):
            for urdf in SIMPLER_URDFS:
                for pose, (x, y, yaw) in SIMPLER_DRAWER_POSES.items():
                    eps.append(dict(google, env_name=f"{verb}{drawer}DrawerCustomInScene-v0", max_episode_steps=113,
                                    scene_name="dummy_drawer", overlay=f"open_drawer_{pose}.png", robot_xy=(x, y),
                                    robot_yaw=yaw, obj={"init_xy": [0.0, 0.0]},
                                    build=dict(drawer_kw, urdf_version=urdf)))
    elif task == "google_place_apple_in_drawer":  # 3 poses x 3 x 3 apple positions x 4 URDFs = 108
        for urdf in SIMPLER_URDFS:
            for pose in ("a0", "b0", "c0"):
                x, y, yaw = SIMPLER_DRAWER_POSES[pose]
                for ox in _grid(-0.08, -0.02, 3):
                    for oy in _grid(-0.02, 0.08, 3):
                        eps.append(dict(google, env_name="PlaceIntoClosedTopDrawerCustomInScene-v0",
                                        max_episode_steps=200, scene_name="dummy_drawer",
                                        overlay=f"open_drawer_{pose}.png", robot_xy=(x, y), robot_yaw=yaw,
                                        obj={"init_xy": [ox, oy]},
                                        build=dict(drawer_kw, urdf_version=urdf, model_ids="baked_apple_v2")))
    elif task.startswith("widowx_"):  # 24 episodes each
        env_name = {"widowx_spoon_on_towel": "PutSpoonOnTableClothInScene-v0",
                    "widowx_carrot_on_plate": "PutCarrotOnPlateInScene-v0",
                    "widowx_stack_block": "StackGreenCubeOnYellowCubeBakedTexInScene-v0",
                    "widowx_eggplant_in_basket": "PutEggplantInBasketScene-v0"}.get(task)
        if env_name is None:
            raise ValueError(f"unknown SimplerEnv task {task!r}; known: {', '.join(SIMPLER_TASKS)}")
        setup = dict(bridge, env_name=env_name)
        if task == "widowx_eggplant_in_basket":  # the sink scene
            setup.update(robot="widowx_sink_camera_setup", scene_name="bridge_table_1_v2", overlay="bridge_sink.png",
                         robot_xy=(0.127, 0.06), max_episode_steps=120)
        eps = [dict(setup, obj={"episode_id": k}) for k in range(24)]
    else:
        raise ValueError(f"unknown SimplerEnv task {task!r}; known: {', '.join(SIMPLER_TASKS)}")
    return eps


def _quat_mul(a, b):
    """Hamilton product of two (w, x, y, z) quaternions."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _euler_to_quat(roll, pitch, yaw):
    """transforms3d euler2quat(roll, pitch, yaw, 'sxyz') (static axes: R = Rz(yaw) Ry(pitch) Rx(roll)), wxyz."""
    ci, si = np.cos(roll / 2), np.sin(roll / 2)
    cj, sj = np.cos(pitch / 2), np.sin(pitch / 2)
    ck, sk = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array([cj * ci * ck + sj * si * sk, cj * si * ck - sj * ci * sk,
                     cj * si * sk + sj * ci * ck, cj * ci * sk - sj * si * ck])


def euler_to_axis_angle(roll, pitch, yaw):
    """Euler delta (rad) -> the rotation vector axis * angle that SimplerEnv's controllers take
    (transforms3d euler2axangle, then axis * angle, as RoboVLMs and SimplerEnv's own policies do)."""
    w, x, y, z = _euler_to_quat(roll, pitch, yaw)
    n2 = x * x + y * y + z * z
    if n2 < (3 * np.finfo(np.float64).eps) ** 2:  # identity rotation
        return np.zeros(3)
    return np.array([x, y, z]) / np.sqrt(n2) * 2 * np.arccos(np.clip(w, -1.0, 1.0))


def simpler_robot_quat(yaw):
    """Robot base orientation as SimplerEnv's scripts build it: euler2quat(0, 0, yaw) * quat-center (0, 0, 0, 1)
    (a half turn about z, given in sapien's w-first order), wxyz."""
    return _quat_mul(_euler_to_quat(0.0, 0.0, yaw), (0.0, 0.0, 0.0, 1.0))


class SimplerActionAdapter:
    """Canonical action (7,) in the dataset's units (Policy.act already unnormalized it with the checkpoint's
    q01/q99 statistics) -> the (7,) float64 ndarray SimplerEnv's controllers take:
    [xyz delta (m), rotation vector (rad), gripper]. Gripper, as RoboVLMs' wrapper:
      Google robot (delta gripper, + closes): prev_open - cur_open in {-2, 0, 2} (0 on the first step); a change
        is repeated for SIMPLER_STICKY_REPEAT steps (sticky), then back to the relative rule.
      WidowX (absolute, -1 close / +1 open): +1 only from the SIMPLER_OPEN_DELAY-th consecutive open prediction,
        so the very first step always closes.
    """

    def __init__(self, robot, sticky_repeat=SIMPLER_STICKY_REPEAT, open_delay=SIMPLER_OPEN_DELAY):
        if "google_robot" not in robot and "widowx" not in robot:
            raise ValueError(f"unknown SimplerEnv robot {robot!r}: expected google_robot_* or widowx*")
        self.google, self.sticky_repeat, self.open_delay = "google_robot" in robot, sticky_repeat, open_delay
        self.reset()

    def reset(self):
        self.prev_open, self.sticky_left, self.sticky_value, self.open_count = None, 0, 0.0, 0

    def __call__(self, a7):
        a = np.asarray(a7, dtype=np.float64)
        if a.shape != (7,) or not np.isfinite(a).all():
            raise ValueError(f"expected a finite action of shape (7,) [dx,dy,dz,droll,dpitch,dyaw,gripper], got {a}")
        cur_open = 1.0 if a[6] > 0 else -1.0
        if self.google:
            g = 0.0 if self.prev_open is None else self.prev_open - cur_open
            self.prev_open = cur_open
            if abs(g) > 0.5 and self.sticky_left == 0:
                self.sticky_left, self.sticky_value = self.sticky_repeat, g
            if self.sticky_left > 0:
                g, self.sticky_left = self.sticky_value, self.sticky_left - 1
        else:
            self.open_count = self.open_count + 1 if cur_open > 0 else 0
            g = 1.0 if self.open_count >= self.open_delay else -1.0
        return np.concatenate([a[:3], euler_to_axis_angle(*a[3:6]), [g]])


def _import_simpler():
    try:
        from simpler_env.utils.env.env_builder import build_maniskill2_env, get_robot_control_mode
        from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict
    except ImportError as e:
        raise ImportError(
            f"SimplerEnv evaluation needs simpler_env and mani_skill2_real2sim ({e}). Neither is on PyPI: "
            "`git clone --recurse-submodules https://github.com/simpler-env/SimplerEnv && pip install -e "
            "SimplerEnv/ManiSkill2_real2sim -e SimplerEnv` (Python 3.10/3.11, numpy<2, a Vulkan-capable GPU); "
            "see docs/calvin_simpler.md.") from e
    return build_maniskill2_env, get_robot_control_mode, get_image_from_maniskill2_obs_dict


def simpler_overlay_dir(overlay_dir=None):
    """Folder of the real-image overlays (ManiSkill2_real2sim/data/real_inpainting)."""
    if overlay_dir is None:
        root = os.environ.get("MS2_REAL2SIM_ASSET_DIR")
        if root is None:
            try:
                import mani_skill2_real2sim
                root = Path(mani_skill2_real2sim.__file__).resolve().parents[1] / "data"
            except ImportError:
                root = "ManiSkill2_real2sim/data"
        overlay_dir = Path(root) / "real_inpainting"
    if not Path(overlay_dir).is_dir():
        raise FileNotFoundError(f"SimplerEnv overlay images not found in {overlay_dir}: pass --simpler-overlays "
                                "SimplerEnv/ManiSkill2_real2sim/data/real_inpainting (or set MS2_REAL2SIM_ASSET_DIR)")
    return Path(overlay_dir)


# "Open top drawer and place apple": when the second instruction ("place apple into top drawer") starts.
#   drawer_open: RoboVLMs' evaluator, as soon as the env's episode_stats["is_drawer_open"] is set (the drawer was
#                once >= 15 cm open), else the env's own switch; the default, so numbers compare with the paper's.
#   midpoint:    only the env's own switch (the first step after step 100; SimplerEnv's evaluator, which
#                advances early only on a predicted terminate, which RoboVLMs never predicts).
SIMPLER_SUBTASK_RULES = ("drawer_open", "midpoint")


def simpler_run_episode(ep, policy, overlay_dir, subtask_rule="drawer_open"):
    """One episode exactly as the reference evaluators run it: a fresh env, reset to the episode's robot and
    object placement, actions until the time limit truncates (RoboVLMs never predicts termination), success =
    the env's `done` at the last step, grasp = episode_stats['is_src_obj_grasped'] (ever grasped) where reported.
    The policy history (and gripper state) is reset at the start and whenever the instruction changes.
    subtask_rule: when a two-instruction task moves on (SIMPLER_SUBTASK_RULES)."""
    if subtask_rule not in SIMPLER_SUBTASK_RULES:
        raise ValueError(f"subtask_rule must be one of {SIMPLER_SUBTASK_RULES}, got {subtask_rule!r}")
    build_env, control_mode, get_image = _import_simpler()
    env = build_env(ep["env_name"], **ep["build"], obs_mode="rgbd", robot=ep["robot"], sim_freq=ep["sim_freq"],
                    control_mode=control_mode(ep["robot"], "robovlms"), control_freq=ep["control_freq"],
                    max_episode_steps=ep["max_episode_steps"], scene_name=ep["scene_name"],
                    camera_cfgs={"add_segmentation": True}, rgb_overlay_path=str(Path(overlay_dir) / ep["overlay"]))
    try:
        obs, _ = env.reset(options={"robot_init_options": {"init_xy": np.array(ep["robot_xy"]),
                                                           "init_rot_quat": simpler_robot_quat(ep["robot_yaw"])},
                                    "obj_init_options": dict(ep["obj"])})
        base = env.unwrapped  # the task methods; gymnasium>=1.0 wrappers no longer forward attributes
        instruction = first = base.get_language_instruction()
        adapter = SimplerActionAdapter(ep["robot"])
        policy.reset()
        done, truncated, info, steps, switched = False, False, {}, 0, None
        while not truncated:
            if steps >= ep["max_episode_steps"]:
                raise RuntimeError(f"{ep['env_name']} did not truncate after max_episode_steps={steps}")
            action = adapter(policy.act({"static": get_image(base, obs)}, instruction))
            obs, _, done, truncated, info = env.step(action)
            steps += 1
            if subtask_rule == "drawer_open" and info.get("episode_stats", {}).get("is_drawer_open") \
                    and not base.is_final_subtask():
                base.advance_to_next_subtask()  # RoboVLMs: the drawer is open, go on to placing the apple
            new = base.get_language_instruction()
            if new != instruction:  # place-apple: "open top drawer" -> "place apple into top drawer"
                instruction, switched = new, steps  # the next action (step steps + 1) gets the new instruction
                policy.reset()
                adapter.reset()
    finally:
        env.close()
    stats = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(info.get("episode_stats", {})).items()}
    return {"success": bool(done), "grasped": bool(stats["is_src_obj_grasped"]) if "is_src_obj_grasped" in stats
            else None, "steps": steps, "instruction": first, "episode_stats": stats, "switched_after": switched}


def simpler_summary(records):
    """{task: [episode records]} -> {task: {"success", "grasp" (or None), "episodes"}}."""
    out = {}
    for task, recs in records.items():
        grasp = [r["grasped"] for r in recs if r["grasped"] is not None]
        out[task] = {"success": float(np.mean([r["success"] for r in recs])), "episodes": len(recs),
                     "grasp": float(np.mean(grasp)) if grasp else None}
    return out


def simpler_table(summary, method="RoboVLMs (this run)", subtask_rule=None):
    """Markdown in the layout of the paper's Extended Table 3 (a) WidowX+Bridge and (b) Google Robot.
    subtask_rule: named under the table when the apple task was run (SIMPLER_SUBTASK_RULES)."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    def get(task, key="success"):
        return summary[task][key] if task in summary else None

    def mean(*vals):
        return None if any(v is None for v in vals) else float(np.mean(vals))

    text = "### SimplerEnv (visual matching)\n\n"
    if any(t.startswith("widowx_") for t in summary):
        cols = [("widowx_spoon_on_towel", "Put Spoon on Towel", "Grasp Spoon"),
                ("widowx_carrot_on_plate", "Put Carrot on Plate", "Grasp Carrot"),
                ("widowx_stack_block", "Stack Green Block on Yellow Block", "Grasp Green Block"),
                ("widowx_eggplant_in_basket", "Put Eggplant in Yellow Basket", "Grasp Eggplant")]
        text += ("(a) WidowX + Bridge\n\n| Method | " + " | ".join(f"{t}: {g} | {t}: final" for _, t, g in cols)
                 + " |\n|---|" + "---:|" * 8 + f"\n| {method} | "
                 + " | ".join(f"{f(get(k, 'grasp'))} | {f(get(k))}" for k, _, _ in cols) + " |\n\n")
    if any(t.startswith("google_") for t in summary):
        h, v, s = (get(f"google_pick_coke_can_{o}") for o in ("horizontal", "vertical", "standing"))
        o, c = get("google_open_drawer"), get("google_close_drawer")
        row = [h, v, s, mean(h, v, s), get("google_move_near"), o, c, mean(o, c), get("google_place_apple_in_drawer")]
        text += ("(b) Google Robot\n\n| Method | Pick Coke Can: Horizontal Laying | Vertical Laying | Standing | "
                 "Average | Move Near: Average | Open/Close Drawer: Open | Close | Average | "
                 "Open Top Drawer and Place Apple: Average |\n|---|" + "---:|" * 9 + f"\n| {method} | "
                 + " | ".join(f(x) for x in row) + " |\n")
    if subtask_rule and "google_place_apple_in_drawer" in summary:
        how = {"drawer_open": "as soon as the drawer is open (RoboVLMs' evaluator, the paper's numbers)",
               "midpoint": "after step 100 only (the env's own switch)"}[subtask_rule]
        text += f"\nOpen Top Drawer and Place Apple: second instruction `{subtask_rule}`: {how}.\n"
    return text


def simpler_task_names(spec):
    """'all' | 'google' | 'widowx' | comma-separated task names -> list of task names."""
    names = []
    for part in (spec or "all").split(","):
        part = part.strip()
        if part == "all":
            names += list(SIMPLER_TASKS)
        elif part in ("google", "widowx"):
            names += [t for t in SIMPLER_TASKS if t.startswith(part)]
        elif part in SIMPLER_TASKS:
            names.append(part)
        else:
            raise ValueError(f"unknown SimplerEnv task {part!r}; use all, google, widowx or any of "
                             f"{', '.join(SIMPLER_TASKS)}")
    return list(dict.fromkeys(names))


def evaluate_simpler(policy_for, tasks="all", overlay_dir=None, out_dir=None, max_episodes=None, progress=True,
                     subtask_rule="drawer_open"):
    """Run the visual-matching grids of `tasks`. policy_for(kind) returns the policy for "google_robot" or
    "widowx" (each needs its own unnormalization statistics: SIMPLER_STATS_KEYS). max_episodes caps each
    task's grid (quick checks; the paper's numbers need the full grids). subtask_rule: the apple task's switch
    (SIMPLER_SUBTASK_RULES, named under the table). Writes simpler_episodes.json, simpler_results.json and
    simpler_results.md under out_dir. Returns the summary."""
    from tqdm import tqdm
    overlay_dir = simpler_overlay_dir(overlay_dir)
    records = {}
    for task in simpler_task_names(tasks) if isinstance(tasks, str) else list(tasks):
        eps = simpler_episodes(task)[:max_episodes]
        policy = policy_for("google_robot" if task.startswith("google_") else "widowx")
        bar = tqdm(eps, desc=task, unit="ep", disable=not progress)
        records[task] = []
        for ep in bar:
            records[task].append(dict(simpler_run_episode(ep, policy, overlay_dir, subtask_rule), env_name=ep["env_name"],
                                      obj=ep["obj"], urdf_version=ep["build"].get("urdf_version")))
            bar.set_postfix(success=f"{np.mean([r['success'] for r in records[task]]):.2f}")
    summary = simpler_summary(records)
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "simpler_episodes.json", records)
        _write_json(out_dir / "simpler_results.json", summary)
        (out_dir / "simpler_results.md").write_text(simpler_table(summary, subtask_rule=subtask_rule))
    return summary


# -----------------------------------------------------------------------------------------------------------
# N. Command line
# -----------------------------------------------------------------------------------------------------------

def run_metaworld_eval(ckpt, episodes=10, seed=0, execution=None, tasks=None, out=None, gifs=True,
                       device="cpu", progress=True, workers=None, scene="seen", instructions="seen",
                       cache_dir=None):
    """Load a run directory's Policy and re-run the Meta-World protocol; writes results.md under `out`."""
    from vla import Policy
    ckpt = Path(ckpt)
    train_args = json.loads((ckpt / "train_args.json").read_text()) if (ckpt / "train_args.json").exists() else {}
    tasks = tasks or train_args.get("tasks") or list(DEFAULT_TASKS)
    execution = execution or train_args.get("execution", "chunk")  # default: as train.py evaluated it
    rank, world = rank_world()  # under torchrun: episodes are sharded over the ranks
    if device == "cuda" and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    workers = workers or (max(1, min(8, os.cpu_count() or 1) // world) if device == "cpu" else 1)
    policy = str(ckpt) if workers > 1 else Policy.from_pretrained(str(ckpt), execution=execution, device=device)
    split = "".join(f"_{v}" for v in (scene, instructions) if v != "seen")  # "", "_shifted", "_paraphrased", ...
    out = Path(out or ckpt / f"eval_metaworld_seed{seed}_{execution}{split}")
    t0 = time.time()
    results = evaluate_metaworld(policy, tasks, episodes, seed, image_size=train_args.get("image_size", 64),
                                 cameras=tuple(train_args.get("views", ("static", "wrist"))),
                                 max_steps=train_args.get("max_steps", 200), gif_dir=out if gifs else None,
                                 progress=progress, workers=workers, execution=execution, scene=scene,
                                 instructions=instructions, cache_dir=cache_dir)
    header = (f"## Meta-World closed-loop evaluation\n\ncheckpoint `{ckpt}`, {episodes} episodes per task, "
              f"evaluation seed {seed} (episode seeds {eval_seeds(seed, episodes)[0]}..), execution `{execution}`, "
              f"scene `{scene}`, instructions `{instructions}`, "
              f"{time.time() - t0:.0f} s")
    if rank != 0:
        return results, results_table(results)
    return results, write_results(out, results, header)


def run_replay_eval(ckpt, datasets, episodes=10, execution="first", device="cpu", out=None):
    """--data runs without a simulator: replay recorded episodes through Policy.act, frame by frame in order.

    For each dataset (keyed by its statistics key) the first `episodes` segments are fed to a Policy built for
    that key (its own history and action execution, exactly as in closed loop; only the next frame comes from
    the recording instead of the environment) and each returned action is compared with the recorded one:
    pose L1 in normalized units (dims 0-5, eq. 6) and gripper sign agreement. "zero L1" is the L1 of always
    predicting the middle of the normalized range, a floor to read the number against. These are the training
    datasets' own episodes: a fit check of the run, not a generalization result. Writes replay.md under `out`.
    """
    from data import normalize_action
    from vla import Policy, load_checkpoint
    model, stats, _ = load_checkpoint(str(ckpt), device)
    lines = ["| dataset | segments | frames | pose L1 | zero L1 | gripper agreement |", "|---|---|---|---|---|---|"]
    results = {}
    for ds in datasets:
        policy = Policy(model, stats, execution=execution, dataset_key=ds.key)
        pred, true = [], []
        for seg in range(min(episodes, len(ds.seg_start))):
            rows = np.arange(ds.seg_start[seg], ds.seg_end[seg] + 1)
            frames = ds._load_frames(seg, rows)  # {view: (T, h, w, 3)}
            policy.reset()
            for i, r in enumerate(rows):
                pred.append(policy.act({v: frames[v][i] for v in ds.views}, ds.instructions[seg]))
                true.append(ds.raw_actions[r])
        norm = dict(mode=model.config.action_norm, bound=model.config.norm_bound)
        p, t = normalize_action(np.stack(pred), ds.stats, **norm), normalize_action(np.stack(true), ds.stats, **norm)
        results[ds.key] = res = {"segments": seg + 1, "frames": len(t), "pose_l1": float(np.abs(p - t)[:, :6].mean()),
                               "zero_l1": float(np.abs(t[:, :6]).mean()),
                               "gripper_agreement": float((np.sign(p[:, 6]) == np.sign(t[:, 6])).mean())}
        lines.append(f"| {ds.key} | {res['segments']} | {res['frames']} | {res['pose_l1']:.3f} | "
                     f"{res['zero_l1']:.3f} | {100 * res['gripper_agreement']:.0f}% |")
    text = (f"## Replay of recorded episodes (Policy.act frame by frame, execution `{execution}`)\n\n"
            + "\n".join(lines) + "\n")
    out = Path(out or ckpt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.md").write_text(text)
    _write_json(out / "replay.json", results)
    return results, text


def _policy(ckpt, execution, dataset_key, device):
    from vla import Policy
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return Policy.from_pretrained(str(ckpt), execution=execution, dataset_key=dataset_key, device=device)


def run_calvin_eval(ckpt, calvin_root, out=None, execution="first", dataset_key=None, device="cpu",
                    sequences_file=None, num_sequences=CALVIN_NUM_SEQUENCES, instructions_file=None, novel=False,
                    progress=True):
    """Policy from a run directory on the official CALVIN protocol (shard with torchrun --nproc_per_node=N)."""
    rank, _, _ = init_distributed()  # the group only gathers small Python objects: gloo
    policy = _policy(ckpt, execution, dataset_key, device)
    env, oracle = make_calvin(calvin_root)
    sequences = (load_calvin_sequences(sequences_file) if sequences_file else calvin_sequences())[:num_sequences]
    instructions = load_calvin_instructions(instructions_file, sequences, novel) if instructions_file else None
    out = Path(out or Path(ckpt) / f"eval_calvin_{execution}")
    summary = evaluate_calvin(policy, env, oracle, sequences, instructions, out, progress=progress and rank == 0)
    return summary, calvin_table(summary, train=Path(calvin_root).name)


def run_simpler_eval(ckpt, tasks="all", out=None, execution="first", dataset_key=None, device="cpu",
                     overlay_dir=None, max_episodes=None, progress=True, subtask_rule="drawer_open"):
    """Policy from a run directory on the SimplerEnv visual-matching grids (Extended Table 3 layout)."""
    cache = {}

    def policy_for(kind):  # one Policy per robot: each unnormalizes with its own dataset's statistics
        key = dataset_key or SIMPLER_STATS_KEYS[kind]
        if key not in cache:
            cache[key] = _policy(ckpt, execution, key, device)
        return cache[key]

    out = Path(out or Path(ckpt) / f"eval_simpler_{execution}")
    summary = evaluate_simpler(policy_for, tasks, overlay_dir, out, max_episodes, progress, subtask_rule)
    return summary, simpler_table(summary, subtask_rule=subtask_rule)


def main(argv=None):
    import argparse
    from vla import EXECUTIONS
    p = argparse.ArgumentParser(description="Closed-loop evaluation of a trained VLA run directory.")
    p.add_argument("--ckpt", required=True, help="run directory written by train.py (model.safetensors, ...)")
    p.add_argument("--benchmark", default="metaworld", choices=["metaworld", "calvin", "simpler"])
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (same seed -> same numbers)")
    p.add_argument("--execution", default=None, choices=EXECUTIONS,
                   help="chunk: run the whole predicted chunk open loop; first: re-plan every step; "
                        "ensemble: ACT temporal ensembling (default: metaworld the run's own train.py "
                        "--execution, calvin/simpler first)")
    p.add_argument("--tasks", default=None, help="comma-separated Meta-World tasks (default: the run's tasks)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval_<benchmark>_seed<S>_<exec>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="evaluation processes (0 = all cores on CPU)")
    p.add_argument("--cache-dir", default="data_cache", help="Meta-World: the expert and random columns are cached "
                   "here per evaluation seed (they do not depend on the policy); '' = always recompute")
    p.add_argument("--scene", default="seen", choices=SCENES, help="Meta-World: seen = the training scene; shifted "
                   "= recoloured, relit, cameras moved (per episode seed; the miniature of CALVIN's scene D)")
    p.add_argument("--instructions", default="seen", choices=INSTRUCTION_SETS, help="Meta-World: seen = the "
                   "training instruction; paraphrased = a held-out paraphrase per episode seed; generic = "
                   f"{GENERIC_INSTRUCTION!r} for every task (a probe: how much the policy reads off the scene)")
    # CALVIN (section 4) and SimplerEnv (section 5)
    p.add_argument("--calvin-root", default=None, help="CALVIN split directory holding validation/ (e.g. task_ABCD_D)")
    p.add_argument("--calvin-sequences", default=None, help="official eval_sequences.json (default: regenerate the "
                   "identical 1000 chains)")
    p.add_argument("--num-sequences", type=int, default=CALVIN_NUM_SEQUENCES, help="CALVIN: the first N chains")
    p.add_argument("--calvin-instructions", default=None, help="CALVIN instructions: per-sequence JSON list, or a "
                   "{task: [texts]} YAML/JSON (default: the first validation instruction per task)")
    p.add_argument("--calvin-novel", action="store_true", help="CALVIN: draw one paraphrase per subtask from "
                   "--calvin-instructions (the novel-instruction variant)")
    p.add_argument("--task", default="all", help="SimplerEnv: all, google, widowx or comma-separated task names")
    p.add_argument("--simpler-overlays", default=None, help="SimplerEnv's ManiSkill2_real2sim/data/real_inpainting")
    p.add_argument("--max-episodes", type=int, default=None, help="SimplerEnv: cap each task's grid (quick check)")
    p.add_argument("--apple-switch", default="drawer_open", choices=SIMPLER_SUBTASK_RULES,
                   help="SimplerEnv place-apple task: second instruction as soon as the drawer is open (RoboVLMs, "
                        "default) or only after step 100 (midpoint, the env's own switch)")
    p.add_argument("--dataset-key", default=None, help="checkpoint statistics key to unnormalize with (SimplerEnv "
                   "default: bridge_orig for WidowX, fractal20220817_data for Google)")
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_dir():
        raise SystemExit(f"--ckpt {args.ckpt!r} is not a directory; pass a run directory written by train.py")
    if args.benchmark == "metaworld":
        try:  # before loading anything: a missing OpenGL library otherwise fails inside the worker pool
            check_rendering("the Meta-World evaluation episodes")
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
        tasks = args.tasks.split(",") if args.tasks else None
        rank, _, _ = init_distributed()  # torchrun --nproc_per_node=N evaluate.py ...: episodes sharded over ranks
        _, text = run_metaworld_eval(args.ckpt, args.episodes, args.seed, args.execution, tasks, args.out,
                                     device=args.device, workers=args.workers or None, progress=rank == 0,
                                     scene=args.scene, instructions=args.instructions,
                                     cache_dir=args.cache_dir or None)
        if rank == 0:
            print(text)
    elif args.benchmark == "calvin":
        if not args.calvin_root:
            raise SystemExit("--benchmark calvin needs --calvin-root DIR (a CALVIN split that holds validation/)")
        _, text = run_calvin_eval(args.ckpt, args.calvin_root, args.out, args.execution or "first", args.dataset_key,
                                  args.device, args.calvin_sequences, args.num_sequences, args.calvin_instructions,
                                  args.calvin_novel)
        if rank_world()[0] == 0:
            print(text)
    elif args.benchmark == "simpler":
        _, text = run_simpler_eval(args.ckpt, args.task, args.out, args.execution or "first", args.dataset_key, args.device,
                                   args.simpler_overlays, args.max_episodes, subtask_rule=args.apple_switch)
        print(text)


if __name__ == "__main__":
    try:
        main()
    finally:
        end_distributed()
