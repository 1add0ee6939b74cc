"""The paper's findings in miniature: each ablation trained and evaluated on the built-in Meta-World suite.

Every variant is one `python train.py ...` run per seed (no evaluation inside), then one
`python evaluate.py --ckpt RUN --execution E` per execution strategy, on the same evaluation seeds for every
variant. The script writes, per table, RUN_ROOT/<table>.md (the paper's layout: variant, mean closed-loop
success over the tasks, mean ± std over training seeds, per-seed values, the paper's number next to it) and
RUN_ROOT/<table>.png (a bar chart drawn with pillow). Finished runs are reused, so an interrupted sweep resumes.

  python benchmarks/findings.py --table formulations    # Table I: the four formulations, 3 seeds
  python benchmarks/findings.py --table objectives      # Table IIa: MSE vs flow matching x Chunk/First/Ensemble
  python benchmarks/findings.py --table moe             # Table IIb: with / without the MoE action expert
  python benchmarks/findings.py --table data            # Extended Table 4: 10% vs 100% of the demonstrations
  python benchmarks/findings.py --table all --dry-run   # print every command, run nothing

Several processes may share one sweep (each run directory is locked while it trains and evaluates), e.g. one
single-threaded process per core: OMP_NUM_THREADS=1 python benchmarks/findings.py --table formulations
--workers 1 --train-args "--threads 1 --loader-workers 0" & (the same for --table objectives) & wait.
--only TEXT runs just the variants whose label contains TEXT (no table written).

The paper's numbers are CALVIN results (consecutive-task success and Avg. Len. out of 5) of multi-billion
parameter backbones; ours are Meta-World success rates of the ~1M-parameter `tiny` VLM without any
vision-language pre-training. Compare the ordering of the variants, not the values.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRINTED = set()  # --dry-run: each command once


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", default="all", choices=[*TABLES, "all"])
    p.add_argument("--seeds", default="0,1,2", help="training seeds (each also draws its own demonstrations)")
    p.add_argument("--tasks", default=None, help="comma-separated Meta-World tasks (default: train.py's)")
    p.add_argument("--steps", type=int, default=1200, help="training steps per run (train.py --steps; the main "
                   "job trains 3500: the sweep's 30 runs must fit a 2-core machine)")
    p.add_argument("--episodes", type=int, default=5, help="evaluation episodes per task")
    p.add_argument("--eval-seed", type=int, default=0, help="the same evaluation episodes for every variant")
    p.add_argument("--workers", type=int, default=0, help="processes for demos and evaluation (0 = all cores)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. '--chunk 8'")
    p.add_argument("--out", default="runs/findings", help="root of the run directories and the tables")
    p.add_argument("--only", default=None, metavar="TEXT", help="run only the variants whose label contains TEXT "
                   "(e.g. '0.1x'), to split a sweep over processes; no table is written")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:
        p.error("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    return args


def train_command(args, variant, seed, run_dir):
    cmd = [sys.executable, "train.py", *variant.flags, "--seed", str(seed), "--steps", str(args.steps),
           "--eval-episodes", "0", "--workers", str(args.workers), "--out", str(run_dir)]
    if args.tasks:
        cmd += ["--tasks", args.tasks]
    return cmd + args.train_args.split()


def eval_command(args, run_dir, execution):
    out = run_dir / f"eval_{execution}_seed{args.eval_seed}"
    cmd = [sys.executable, "evaluate.py", "--ckpt", str(run_dir), "--benchmark", "metaworld", "--execution", execution,
           "--episodes", str(args.episodes), "--seed", str(args.eval_seed), "--workers", str(args.workers),
           "--out", str(out)]
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


def run_variant(args, table, variant, seed):
    """Train (once per run name and seed) and evaluate one variant. -> (mean success over tasks, seconds)."""
    run_dir = Path(args.out) / variant.run / f"seed{seed}"  # shared by every table that uses this run
    abs_run = ROOT / run_dir
    tcmd = train_command(args, variant, seed, run_dir)
    ecmd, eout = eval_command(args, run_dir, variant.execution)
    if args.dry_run:
        for c in (tcmd, ecmd):
            if show(c) not in PRINTED:
                PRINTED.add(show(c))
                print("  $", show(c))
        return None, {}
    with run_lock(abs_run):  # several findings.py processes may share one sweep (e.g. one per core)
        timing = abs_run / "findings_time.json"
        times = json.loads(timing.read_text()) if timing.exists() and not args.force else {}
        if args.force or not (abs_run / "config.json").exists() or "train" not in times:
            clear_training(abs_run)
            times["train"] = run(tcmd, abs_run / "train.log")
            timing.write_text(json.dumps(times))
        if args.force or not (ROOT / eout / "results.json").exists() or variant.execution not in times:
            times[variant.execution] = run(ecmd, abs_run / f"eval_{variant.execution}.log")
            timing.write_text(json.dumps(times))
    results = json.loads((ROOT / eout / "results.json").read_text())
    success = sum(r["policy"] for r in results.values()) / len(results)
    return success, {str(run_dir): times["train"], f"{run_dir}:{variant.execution}": times[variant.execution]}


def clear_training(run_dir):
    """Before (re-)training a run: remove what an earlier, forced or interrupted, training left there. train.py
    refuses an --out that holds another run's checkpoints, weights or metrics (the two would mix)."""
    import shutil
    for name in ("checkpoints", "tb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("model.safetensors", "metrics.csv"):
        (run_dir / name).unlink(missing_ok=True)


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


def markdown(args, spec, rows, wall):
    lines = [f"## {spec['title']}", "",
             f"Meta-World tasks: {args.tasks or 'train.py default'}; {args.steps} training steps; "
             f"{args.episodes} evaluation episodes per task (evaluation seed {args.eval_seed}); training seeds "
             f"{','.join(map(str, args.seeds))}; extra train.py flags: `{args.train_args or 'none'}`.",
             f"Hardware: {hardware()}. Wall time (each training once, plus every evaluation): {wall / 60:.1f} min.",
             "", "| variant | execution | success (mean ± std over seeds) | per seed | paper |",
             "|---|---|---:|---|---:|"]
    for v, vals in rows:
        m, s = mean_std(vals)
        per = ", ".join(f"{100 * x:.0f}%" for x in vals)
        lines.append(f"| {v.label} | {v.execution} | {100 * m:.1f}% ± {100 * s:.1f} | {per} | {v.paper} |")
    lines += ["", spec["note"], ""]
    return "\n".join(lines)


def bar_chart(title, rows, path):
    """Horizontal bars (mean success, 0-100 %) with a ±std whisker and the per-seed values as dots."""
    from PIL import Image, ImageDraw
    W, row_h, left, top = 900, 44, 260, 56
    H = top + row_h * len(rows) + 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 12), title, fill="black")
    x0, x1 = left, W - 60
    for pct in range(0, 101, 25):
        x = x0 + (x1 - x0) * pct / 100
        d.line([(x, top - 8), (x, H - 32)], fill=(220, 220, 220))
        d.text((x - 10, H - 26), f"{pct}%", fill="black")
    for i, (v, vals) in enumerate(rows):
        m, s = mean_std(vals)
        y = top + i * row_h
        name = v.label if v.execution in v.label.lower() else f"{v.label} ({v.execution})"
        d.text((12, y + 12), name, fill="black")
        d.rectangle([x0, y + 8, x0 + (x1 - x0) * m, y + row_h - 8], fill=(70, 120, 190))
        lo, hi = max(0.0, m - s), min(1.0, m + s)
        yc = y + row_h / 2
        d.line([(x0 + (x1 - x0) * lo, yc), (x0 + (x1 - x0) * hi, yc)], fill="black", width=2)
        for x in vals:
            cx = x0 + (x1 - x0) * x
            d.ellipse([cx - 3, yc - 3, cx + 3, yc + 3], outline="black", fill=(240, 160, 40))
        d.text((x0 + (x1 - x0) * m + 6, y + 4), f"{100 * m:.0f}%", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    names = list(TABLES) if args.table == "all" else [args.table]
    if not (ROOT / "train.py").exists():
        raise SystemExit(f"train.py not found next to benchmarks/ (looked in {ROOT})")
    for name in names:
        spec = TABLES[name]
        print(f"# {spec['title']}")
        rows, seconds_by_job = [], {}  # a run trained once but evaluated several ways counts once
        for v in spec["variants"]:
            if args.only and args.only not in v.label:
                continue
            vals = []
            for seed in args.seeds:
                success, seconds = run_variant(args, name, v, seed)
                seconds_by_job.update(seconds)
                if success is not None:
                    vals.append(success)
                    print(f"  {v.label} ({v.execution}) seed {seed}: {100 * success:.0f}% success, "
                          f"{sum(seconds.values()):.0f} s (training + evaluation)")
            rows.append((v, vals))
        if args.dry_run or args.only:
            continue
        text = markdown(args, spec, rows, sum(seconds_by_job.values()))
        out = ROOT / args.out
        (out / f"{name}.md").write_text(text)
        bar_chart(spec["title"], rows, out / f"{name}.png")
        print(text)
        print(f"wrote {out / f'{name}.md'} and {out / f'{name}.png'}")


if __name__ == "__main__":
    main()
