"""Worst closed-loop vs batch-recompute difference per backbone family (the numbers behind tests/test_matrix.py).

    python benchmarks/bench_matrix.py [--steps 100] [--threads 1]

For each family in tests/test_matrix.FAMILIES (random tiny models, 32 px, H = 2, L = 2, untrained):
  matrix   the worst |Policy chunk - batch recompute over the last H raw frames| over every applicable
           (formulation, objective) of the matrix, each run for H + 3 closed-loop steps with the default Policy
  100-step the same for one `--steps`-step rollout of the family's history formulation (interleaved where it
           applies, else an LSTM policy head), default Policy: issue #14 requires <= 1e-4
  approx   that rollout with Policy(cache="approximate") (the opt-in KV cache), for comparison: "refused" where the
           backbone has absolute positions, "-" where interleaved does not apply (it changes nothing else)
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import test_matrix as M  # noqa: E402
import vla  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="length of the long rollout")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"closed loop (default Policy) vs batch recompute, max |difference| of the normalized chunk; "
          f"H={M.H}, L={M.L}, {M.S} px")
    print(f"{'family':<16}{'cases':>6}{'matrix worst':>14}{f'{args.steps}-step':>12}{'approx':>12}  "
          f"rollout formulation")
    for family in M.FAMILIES:
        gaps = []
        for _, form, obj in [c for c in M.CASES if c[0] == family and not M.refusal(*c)]:
            model = M.build(family, form, obj).eval()
            gaps.append(M.rollout_gap(model, model.config.window + 3))
        model = M.rollout_model(family)
        long = M.rollout_gap(model, args.steps)
        if model.config.formulation != "interleaved":
            approx = "-"
        elif vla.approximate_cache_error(model.backbone):
            approx = "refused"
        else:
            approx = f"{M.rollout_gap(model, args.steps, cache='approximate'):.2e}"
        form = model.config.formulation + ("" if model.config.formulation != "policy_head" else f"-{model.config.head}")
        print(f"{family:<16}{len(gaps):>6}{max(gaps):>14.2e}{long:>12.2e}{approx:>12}  {form}")


if __name__ == "__main__":
    main()
