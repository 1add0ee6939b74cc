"""The paper's findings in miniature: each ablation trained to the main job's budget and evaluated on the
built-in Meta-World suite, on seen scenes, shifted scenes and paraphrased instructions.

Every variant is one `python train.py ...` run per training seed (no evaluation inside; train.py's own default
budget, the main job's), then one `python evaluate.py --ckpt RUN --execution E` per evaluation condition:
  seen         the training scene and instruction (the miniature of CALVIN's ABCD -> D column),
  shifted      `--scene shifted`: recoloured, relit, cameras moved (the miniature of the unseen scene D),
  paraphrased  `--instructions paraphrased`: held-out paraphrases (the enriched-instruction evaluation).
Each finished evaluation writes one result file, docs/findings/runs/<run>__seed<S>__<execution>__<condition>.json
(per-task successes, episodes, wall times, hardware, commit), which is committed. Those files alone regenerate
the tables, verdicts and charts (`--report`), so a sweep can stop and go on on another machine; finished result
files are never recomputed (unless --force). Checkpoints stay under --out (not committed).

  python benchmarks/findings.py --table formulations    # Table I: the four formulations
  python benchmarks/findings.py --table objectives      # Table IIa: MSE vs flow matching x Chunk/First/Ensemble
  python benchmarks/findings.py --table moe             # Table IIb: with / without the MoE action expert
  python benchmarks/findings.py --table data            # Extended Table 4: 10% vs 100% of the demonstrations
  python benchmarks/findings.py --table all --dry-run   # print every command, run nothing
  python benchmarks/findings.py --report                # docs/findings.md tables + charts from the result files

Several processes may share one sweep (each run directory is locked while it trains and evaluates), e.g. one
single-threaded process per core: OMP_NUM_THREADS=1 python benchmarks/findings.py --table formulations
--workers 1 --train-args "--threads 1 --loader-workers 0" & (the same for --table objectives) & wait.
--only TEXT runs just the variants whose label contains TEXT.

Statistics: a variant's success is the mean over tasks and training seeds, with the standard deviation over
seeds and a 95% Wilson interval over all its episodes (seeds x tasks x episodes). A finding "A beats B" is
reproduced when A's interval lies above B's, not reproduced when it lies below, inconclusive when they overlap;
a finding "A matches B" is consistent when they overlap.

The paper's numbers are CALVIN results (consecutive-task success and Avg. Len. out of 5) of multi-billion
parameter backbones; ours are Meta-World success rates of the `tiny` VLM without any vision-language
pre-training. Compare the ordering of the variants, not the values.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRINTED = set()  # --dry-run: each command once
CONDITIONS = {"seen": [], "shifted": ["--scene", "shifted"], "paraphrased": ["--instructions", "paraphrased"]}
RESULTS = Path("docs/findings/runs")  # one committed JSON per (run, seed, execution, condition)
MARK_BEGIN, MARK_END = "<!-- findings:tables:begin -->", "<!-- findings:tables:end -->"


@dataclass
class Variant:
    label: str  # row name in the table
    run: str  # training-run name: variants that share it share the trained model
    flags: list  # train.py flags of this variant (on top of the common ones)
    execution: str = "first"  # evaluate.py --execution
    paper: str = ""  # the paper's number for the corresponding row


# The paper's numbers (reference/paper-what-matters-in-building-vlas.txt). Table I, Extended Table 4: KosMos (the
# decoder-only backbone, like `tiny`), CALVIN ABCD -> D, "task 1 success / Avg. Len.". Table II: PaliGemma.
TABLES = {
    "formulations": dict(
        title="Table I: VLA formulations",
        note="Paper: KosMos backbone, CALVIN ABCD -> D, H = 16, L = 10, First execution; task-1 success / Avg. Len.",
        variants=[
            Variant("One-Step Disc.", "one_step_discrete", ["--formulation", "one_step_discrete", "--window", "1"],
                    paper="0.424 / 0.55"),
            Variant("One-Step Cont.", "one_step_continuous", ["--formulation", "one_step_continuous", "--window", "1"],
                    paper="0.935 / 4.09"),
            Variant("Interleaved Cont.", "interleaved", ["--formulation", "interleaved"], paper="0.987 / 4.12"),
            Variant("Policy-Head Cont.", "policy_head", ["--formulation", "policy_head"], paper="0.967 / 4.49"),
        ]),
    "objectives": dict(
        title="Table IIa: training objective x execution strategy (one-step continuous)",
        note="Paper: PaliGemma one-step continuous, H = 1, L = 10; Avg. Len. on CALVIN, training split ABC / ABCD.",
        variants=[
            Variant(f"{obj} {ex.capitalize()}", f"one_step_{loss}",
                    ["--formulation", "one_step_continuous", "--window", "1", "--action-loss", loss],
                    execution=ex, paper=ref)
            for obj, loss, refs in (("Flow Matching", "flow", ("3.68 / 4.09", "2.45 / 3.56", "3.14 / 4.12")),
                                    ("MSE+BCE", "mse", ("3.57 / 4.04", "2.19 / 3.06", "3.14 / 3.94")))
            for ex, ref in zip(("chunk", "first", "ensemble"), refs)
        ]),
    "moe": dict(
        title="Table IIb: mixture-of-experts action expert (one-step continuous, Chunk execution)",
        note="Paper: PaliGemma one-step continuous, H = 1, L = 10, Chunk; Avg. Len. on CALVIN, split ABC / ABCD.",
        variants=[
            Variant(f"{obj} {'with' if moe else 'without'} MoE", f"one_step_{loss}{'_moe' if moe else ''}",
                    ["--formulation", "one_step_continuous", "--window", "1", "--action-loss", loss]
                    + (["--moe"] if moe else []), execution="chunk", paper=ref)
            for obj, loss, refs in (("MSE+BCE", "mse", ("3.69 / 3.46", "3.57 / 4.04")),
                                    ("Flow Matching", "flow", ("3.84 / 3.84", "3.68 / 4.10")))
            for moe, ref in zip((True, False), refs)
        ]),
    "data": dict(
        title="Extended Table 4: data efficiency (share of the demonstrations)",
        note="Paper: KosMos, CALVIN ABCD -> D; Avg. Len. at 0.1x / 1x of the training data. Here 0.1x = 3 of the "
             "30 demonstrations per task (the first 3: a true subset).",
        variants=[
            Variant(f"{name} {frac}", form if n is None else f"{form}_{n}demos",
                    ["--formulation", form] + ([] if n is None else ["--demos-per-task", str(n)]), paper=ref)
            for name, form, refs in (("Interleaved", "interleaved", ("2.49", "4.12")),
                                     ("Policy-Head", "policy_head", ("2.52", "4.49")))
            for frac, n, ref in zip(("0.1x", "1x"), (3, None), refs)  # 1x = train.py's 30 demos: Table I's run
        ]),
}


@dataclass
class Finding:
    """One of the paper's claims, checked on our numbers: variant `a` beats (or matches) variant `b`."""
    table: str
    claim: str
    a: str  # variant labels of TABLES[table]
    b: str
    kind: str = "beats"  # "beats" | "matches"
    paper: str = ""  # where the paper says it


FINDINGS = [
    Finding("formulations", "continuous actions beat discrete ones", "One-Step Cont.", "One-Step Disc.",
            paper="§III-C, Table I"),
    Finding("formulations", "history helps: the policy head beats one step", "Policy-Head Cont.", "One-Step Cont.",
            paper="§III-C, Table I"),
    Finding("formulations", "the policy head fuses history better than interleaving", "Policy-Head Cont.",
            "Interleaved Cont.", paper="§III-C, Table I (Avg. Len. 4.49 vs 4.12)"),
    Finding("objectives", "flow matching matches MSE+BCE (Chunk)", "Flow Matching Chunk", "MSE+BCE Chunk",
            kind="matches", paper="Table IIa"),
    Finding("objectives", "Chunk execution beats First (flow matching)", "Flow Matching Chunk",
            "Flow Matching First", paper="Table IIa"),
    Finding("objectives", "Chunk execution beats First (MSE+BCE)", "MSE+BCE Chunk", "MSE+BCE First",
            paper="Table IIa"),
    Finding("moe", "the action expert helps (flow matching)", "Flow Matching with MoE", "Flow Matching without MoE",
            paper="Table IIb (ABC column)"),
    Finding("moe", "the action expert helps (MSE+BCE)", "MSE+BCE with MoE", "MSE+BCE without MoE",
            paper="Table IIb (ABC column)"),
    Finding("data", "more data helps the policy head", "Policy-Head 1x", "Policy-Head 0.1x",
            paper="Extended Table 4"),
    Finding("data", "the policy head is the more data-efficient at 0.1x", "Policy-Head 0.1x", "Interleaved 0.1x",
            paper="Extended Table 4 (2.52 vs 2.49)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", default="all", choices=[*TABLES, "all"])
    p.add_argument("--seeds", default="0,1,2", help="training seeds (each also draws its own demonstrations)")
    p.add_argument("--tasks", default=None, help="comma-separated Meta-World tasks (default: train.py's)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: train.py's own, "
                   "the main job's converged budget)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task")
    p.add_argument("--eval-seed", type=int, default=0, help="the same evaluation episodes for every variant")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"evaluation conditions, of {list(CONDITIONS)}")
    p.add_argument("--workers", type=int, default=0, help="processes for demos and evaluation (0 = all cores)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. '--chunk 8'")
    p.add_argument("--out", default="runs/findings", help="root of the run directories (checkpoints)")
    p.add_argument("--results", default=str(RESULTS), help="where the result files go (committed)")
    p.add_argument("--doc", default="docs/findings.md", help="--report: the page whose tables are regenerated")
    p.add_argument("--only", default=None, metavar="TEXT", help="run only the variants whose label contains TEXT "
                   "(e.g. '0.1x'), to split a sweep over processes")
    p.add_argument("--report", action="store_true", help="regenerate the tables, verdicts and charts from the "
                   "result files only (trains and evaluates nothing)")
    p.add_argument("--picture", action="store_true", help="draw docs/findings/shifted_scene.png (seen vs shifted "
                   "frames of each default task, both cameras) and exit")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="re-run finished runs and evaluations")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:
        p.error("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    args.conditions = [c for c in args.conditions.split(",") if c]
    bad = [c for c in args.conditions if c not in CONDITIONS]
    if bad or not args.conditions:
        p.error(f"--conditions: expected some of {list(CONDITIONS)}, got {args.conditions}")
    for flag in ("steps", "episodes"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag} must be >= 1, got {v}")
    return args


def train_command(args, variant, seed, run_dir):
    cmd = [sys.executable, "train.py", *variant.flags, "--seed", str(seed), "--eval-episodes", "0",
           "--workers", str(args.workers), "--out", str(run_dir)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.tasks:
        cmd += ["--tasks", args.tasks]
    return cmd + args.train_args.split()


def eval_command(args, run_dir, execution, condition="seen"):
    out = run_dir / f"eval_{execution}_seed{args.eval_seed}_{condition}"
    cmd = [sys.executable, "evaluate.py", "--ckpt", str(run_dir), "--benchmark", "metaworld", "--execution", execution,
           "--episodes", str(args.episodes), "--seed", str(args.eval_seed), "--workers", str(args.workers),
           "--out", str(out), *CONDITIONS[condition]]
    if args.tasks:
        cmd += ["--tasks", args.tasks]
    return cmd, out


def show(cmd):
    return " ".join("python" if c == sys.executable else c for c in cmd)


def run(cmd, log_path):
    """Run a command from the repository root; its output goes to log_path. -> wall seconds."""
    print("  $", show(cmd), flush=True)
    t0 = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(open(log_path).readlines()[-20:])
        raise SystemExit(f"command failed (exit {rc}): {show(cmd)}\nlast lines of {log_path}:\n{tail}")
    return time.time() - t0


def result_path(args, run, seed, execution, condition):
    return ROOT / args.results / f"{run}__seed{seed}__{execution}__{condition}.json"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_variant(args, table, variant, seed):
    """Train (once per run name and seed) and evaluate one variant on every condition; each evaluation leaves its
    result file. -> {condition: mean success over tasks} (None in a dry run)."""
    run_dir = Path(args.out) / variant.run / f"seed{seed}"  # shared by every table that uses this run
    abs_run = ROOT / run_dir
    tcmd = train_command(args, variant, seed, run_dir)
    todo = [c for c in args.conditions
            if args.force or not result_path(args, variant.run, seed, variant.execution, c).exists()]
    if args.dry_run:
        for c in [tcmd] + [eval_command(args, run_dir, variant.execution, cond)[0] for cond in args.conditions]:
            if show(c) not in PRINTED:
                PRINTED.add(show(c))
                print("  $", show(c))
        return None
    if todo:
        with run_lock(abs_run):  # several findings.py processes may share one sweep (e.g. one per core)
            timing = abs_run / "findings_time.json"
            times = json.loads(timing.read_text()) if timing.exists() and not args.force else {}
            stale = stale_training(abs_run, tcmd)
            if stale:
                print(f"  {run_dir} was trained with other settings ({stale}): training it again", flush=True)
            if args.force or stale or not (abs_run / "config.json").exists() or "train" not in times:
                clear_training(abs_run)
                times["train"] = run(tcmd, abs_run / "train.log")
                timing.write_text(json.dumps(times))
            train_args = json.loads((abs_run / "train_args.json").read_text())
            for cond in todo:
                ecmd, eout = eval_command(args, run_dir, variant.execution, cond)
                seconds = run(ecmd, abs_run / f"eval_{variant.execution}_{cond}.log")
                results = json.loads((ROOT / eout / "results.json").read_text())
                write_json_atomic(result_path(args, variant.run, seed, variant.execution, cond), dict(
                    run=variant.run, seed=seed, execution=variant.execution, condition=cond,
                    episodes=args.episodes, eval_seed=args.eval_seed,
                    success={t: r["policy"] for t, r in results.items()},
                    expert={t: r.get("expert") for t, r in results.items()},
                    train_flags=variant.flags + args.train_args.split(), steps=train_args.get("steps"),
                    train_seconds=times["train"], eval_seconds=seconds, hardware=hardware(), commit=git_commit(),
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    train_command=show(tcmd), eval_command=show(ecmd)))
    out = {}
    for cond in args.conditions:
        r = json.loads(result_path(args, variant.run, seed, variant.execution, cond).read_text())
        out[cond] = sum(r["success"].values()) / len(r["success"])
    return out


# train.py flags that do not change the trained model (where it runs, how it logs, the evaluation after it)
NOT_THE_MODEL = {"out", "cache_dir", "workers", "threads", "loader_workers", "device", "eval_episodes", "eval_seed",
                 "execution", "max_steps", "ckpt_every", "log_every", "keep_ckpts", "resume", "debug_nan_at_step",
                 "debug_kill_at_step"}


def stale_training(run_dir, tcmd):
    """'' if run_dir holds no training or one made with the settings tcmd gives today; else the differences,
    e.g. "shift_aug: True -> False" (train.py's defaults changed since, or --train-args did): a finished
    checkpoint is only reused for the model this command would train."""
    saved = run_dir / "train_args.json"
    if not saved.exists():
        return ""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train
    now = json.loads(json.dumps(vars(train.parse_args(tcmd[2:]))))  # tuples -> lists, as train_args.json has them
    old = json.loads(saved.read_text())
    diff = [f"{k}: {old.get(k, '(unset)')} -> {v}" for k, v in sorted(now.items())
            if k not in NOT_THE_MODEL and old.get(k, "(unset)") != v]
    return ", ".join(diff)


def clear_training(run_dir):
    """Before (re-)training a run: remove what an earlier, forced or interrupted, training left there. train.py
    refuses an --out that holds another run's checkpoints, weights or metrics (the two would mix); the old
    model's evaluations (eval_* folders and logs) go too."""
    left = [run_dir / n for n in ("checkpoints", "tb", "model.safetensors", "metrics.csv")]
    for p in left + list(run_dir.glob("eval_*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold RUN/findings.lock (holding our pid) while training/evaluating RUN; another process waits for it.
    A lock left by a process that no longer exists is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "findings.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)  # raises if that process is gone
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass  # alive, another user's
            time.sleep(10)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def hardware():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, s


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a binomial proportion k / n (well-behaved at 0 and n, unlike p +- z se)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_results(results_dir):
    """Every result file -> {(run, execution, condition): {seed: record}}."""
    out = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault((r["run"], r["execution"], r["condition"]), {})[r["seed"]] = r
    return out


def summarize(records):
    """{seed: record} -> dict(mean, std over seeds, lo, hi (Wilson over all episodes), per-seed, n episodes)."""
    per_seed = [sum(r["success"].values()) / len(r["success"]) for _, r in sorted(records.items())]
    wins = sum(round(p * r["episodes"]) for r in records.values() for p in r["success"].values())
    n = sum(r["episodes"] * len(r["success"]) for r in records.values())
    m, s = mean_std(per_seed)
    lo, hi = wilson(wins, n)
    return dict(mean=m, std=s, lo=lo, hi=hi, per_seed=per_seed, n=n)


def verdict(a, b, kind):
    """a, b: summaries (or None). 'beats': reproduced / not reproduced / inconclusive; 'matches': consistent /
    not reproduced (the intervals are apart)."""
    if a is None or b is None:
        return "not run yet"
    apart_up, apart_down = a["lo"] > b["hi"], a["hi"] < b["lo"]
    if kind == "matches":
        return "consistent (intervals overlap)" if not (apart_up or apart_down) else "not reproduced (intervals apart)"
    if apart_up:
        return "reproduced"
    if apart_down:
        return "not reproduced (the reverse holds)"
    return "inconclusive (intervals overlap)"


def cell(sm):
    if sm is None:
        return "–"
    spread = f" ± {100 * sm['std']:.1f}" if len(sm["per_seed"]) > 1 else ""  # one seed has no spread over seeds
    return f"{100 * sm['mean']:.1f}%{spread} [{100 * sm['lo']:.0f}, {100 * sm['hi']:.0f}] ({len(sm['per_seed'])}s)"


def seeds_caveat(a, b, wanted=3):
    """' (2 vs 3 seeds)' when either side of a verdict rests on fewer training seeds than the sweep asks for."""
    if a is None or b is None or min(len(a["per_seed"]), len(b["per_seed"])) >= wanted:
        return ""
    return f" ({len(a['per_seed'])} vs {len(b['per_seed'])} seeds)"


def table_summaries(spec, results, conditions):
    return [(v, {c: (summarize(results[(v.run, v.execution, c)]) if (v.run, v.execution, c) in results else None)
                 for c in conditions}) for v in spec["variants"]]


def markdown(name, spec, rows, conditions):
    lines = [f"### {spec['title']}", "",
             "Cell: mean success over tasks and training seeds ± std over seeds [95% Wilson interval over all "
             "episodes] (number of seeds).", "",
             "| variant | execution | " + " | ".join(conditions) + " | paper |",
             "|---|---|" + "---:|" * len(conditions) + "---:|"]
    for v, sm in rows:
        lines.append(f"| {v.label} | {v.execution} | " + " | ".join(cell(sm[c]) for c in conditions)
                     + f" | {v.paper} |")
    lines += ["", spec["note"], ""]
    by_label = {v.label: sm for v, sm in rows}
    fs = [f for f in FINDINGS if f.table == name]
    if fs:
        lines += ["| finding (paper) | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
        for f in fs:
            vs = [verdict(by_label[f.a][c], by_label[f.b][c], f.kind) + seeds_caveat(by_label[f.a][c], by_label[f.b][c])
                  for c in conditions]
            lines.append(f"| {f.claim} ({f.paper}) | " + " | ".join(vs) + " |")
        lines.append("")
    return "\n".join(lines)


def bar_chart(title, rows, conditions, path):
    """Grouped horizontal bars: one bar per condition (mean success), whisker = 95% Wilson interval, dots = seeds."""
    from PIL import Image, ImageDraw
    colors = {"seen": (70, 120, 190), "shifted": (200, 110, 60), "paraphrased": (90, 160, 90)}
    bar_h, left, top = 12, 260, 56
    row_h = bar_h * len(conditions) + 14
    W, H = 900, top + row_h * len(rows) + 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 12), title, fill="black")
    for i, c in enumerate(conditions):
        d.rectangle([left + 120 * i, 32, left + 120 * i + 10, 42], fill=colors.get(c, (120, 120, 120)))
        d.text((left + 120 * i + 14, 31), c, fill="black")
    x0, x1 = left, W - 60
    for pct in range(0, 101, 25):
        x = x0 + (x1 - x0) * pct / 100
        d.line([(x, top - 8), (x, H - 32)], fill=(220, 220, 220))
        d.text((x - 10, H - 26), f"{pct}%", fill="black")
    for i, (v, sm) in enumerate(rows):
        y = top + i * row_h
        name = v.label if v.execution in v.label.lower() else f"{v.label} ({v.execution})"
        d.text((12, y + row_h / 2 - 6), name, fill="black")
        for j, c in enumerate(conditions):
            s = sm[c]
            if s is None:
                continue
            yb = y + 4 + j * bar_h
            d.rectangle([x0, yb, x0 + (x1 - x0) * s["mean"], yb + bar_h - 3], fill=colors.get(c, (120, 120, 120)))
            yc = yb + (bar_h - 3) / 2
            d.line([(x0 + (x1 - x0) * s["lo"], yc), (x0 + (x1 - x0) * s["hi"], yc)], fill="black", width=1)
            for x in s["per_seed"]:
                cx = x0 + (x1 - x0) * x
                d.ellipse([cx - 2, yc - 2, cx + 2, yc + 2], outline="black", fill=(250, 250, 250))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def compute_spent(results):
    """Wall time of every training (counted once per run and seed) and every evaluation, from the result files."""
    train, evals, hw = {}, 0.0, set()
    for recs in results.values():
        for r in recs.values():
            train[(r["run"], r["seed"])] = r["train_seconds"]
            evals += r["eval_seconds"]
            hw.add(r["hardware"])
    return sum(train.values()), evals, len(train), sorted(hw)


def report(args):
    """Regenerate the tables + verdicts between the markers of --doc, and the charts, from the result files."""
    results = load_results(ROOT / args.results)
    conditions = list(CONDITIONS)
    parts = []
    for name, spec in TABLES.items():
        rows = table_summaries(spec, results, conditions)
        parts.append(markdown(name, spec, rows, conditions))
        if any(sm[c] for _, sm in rows for c in conditions):
            bar_chart(spec["title"], rows, conditions, ROOT / "docs" / "findings" / f"{name}.png")
    t_train, t_eval, n_runs, hw = compute_spent(results)
    n_files = sum(len(r) for r in results.values())
    head = (f"Generated by `python benchmarks/findings.py --report` from {n_files} result files in "
            f"`{args.results}` ({n_runs} trained runs). Compute spent: {t_train / 3600:.1f} h of training and "
            f"{t_eval / 3600:.1f} h of evaluation (wall time, each process on its own core). Hardware: "
            f"{'; '.join(hw) or 'none yet'}.\n")
    text = "\n".join([MARK_BEGIN, head] + parts + [MARK_END])
    doc = ROOT / args.doc
    old = doc.read_text() if doc.exists() else ""
    if MARK_BEGIN in old and MARK_END in old:
        new = old[:old.index(MARK_BEGIN)] + text + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = old + ("\n" if old else "") + text + "\n"
    doc.write_text(new)
    print(text)
    print(f"wrote the tables of {doc} and the charts in docs/findings/")


def scene_picture(path, size=128, seed=1_000_000):
    """Rows: seen, shifted. Per default task: the static camera, then the wrist camera, at evaluation seed `seed`."""
    import numpy as np
    from PIL import Image
    sys.path.insert(0, str(ROOT))
    import evaluate
    rows = []
    for scene in evaluate.SCENES:
        tiles = []
        for k, task in enumerate(evaluate.DEFAULT_TASKS):
            env = evaluate.MetaWorldEnv(task, size, scene=scene)
            obs = env.reset(seed + k)
            tiles.append(np.concatenate([obs["static"], obs["wrist"]], 1))
            evaluate.close_renderer()
            env.close()
        rows.append(np.concatenate(tiles, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.picture:
        return scene_picture(ROOT / "docs" / "findings" / "shifted_scene.png")
    if args.report:
        return report(args)
    names = list(TABLES) if args.table == "all" else [args.table]
    if not (ROOT / "train.py").exists():
        raise SystemExit(f"train.py not found next to benchmarks/ (looked in {ROOT})")
    for name in names:
        spec = TABLES[name]
        print(f"# {spec['title']}")
        for v in spec["variants"]:
            if args.only and args.only not in v.label:
                continue
            for seed in args.seeds:
                success = run_variant(args, name, v, seed)
                if success is not None:
                    print(f"  {v.label} ({v.execution}) seed {seed}: " + ", ".join(
                        f"{c} {100 * x:.0f}%" for c, x in success.items()), flush=True)
        if not args.dry_run:
            report(args)  # the page reflects every finished evaluation, table by table


if __name__ == "__main__":
    main()
