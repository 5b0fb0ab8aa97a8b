"""Cost of one diagnosis record beside a plain training step, on the table's problems (issue 27).

Run: ``PYTHONPATH=. python benchmarks/diagnose_cost.py [--repeats 5]``. Per problem of examples/table.yaml:
the median time of a plain step (sample, losses, sum, backward, Adam), of a record without kernels, and of a
record with exact NTK traces and 64-point spectra, in one process, side by side.
"""

import argparse
import time

import numpy as np

from paddle_pinn_balance.recorder import Diagnosis
from paddle_pinn_balance.table import load_table
from paddle_pinn_balance.train import problem_balancer, trainable_parameters


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def time_problem(problem, repeats) -> tuple:
    """(plain step, record without kernels, record with kernels) in ms, medians of ``repeats``."""
    model = problem.build_model(0)
    rng = np.random.default_rng(0)
    balancer = problem_balancer(problem, {"name": "sum"}, model, 0)
    opt, _ = problem.optimizer(trainable_parameters(model, balancer))

    def step():
        balancer(problem.losses(model, problem.sample(rng)), 0).backward()
        opt.step()
        opt.clear_grad()

    def recorder(diag):
        return lambda: diag.record(problem.losses(model, problem.sample(rng)), 0)

    kernels = None
    if callable(getattr(problem, "kernels", None)):
        kernels = problem.kernels(problem.sample(np.random.default_rng([0, 1])))
    step()
    t_step = median_time(step, repeats)
    t_rec = median_time(recorder(Diagnosis(model, every=1)), repeats)
    t_ntk = median_time(recorder(Diagnosis(model, every=1, kernels=kernels)), repeats) if kernels else float("nan")
    return t_step, t_rec, t_ntk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", default="examples/table.yaml")
    args = parser.parse_args()
    print("| problem | plain step (ms) | record, gradients only (ms) | + NTK traces, 64-point spectra (ms) |")
    print("|---|---|---|---|")
    for p in load_table(args.config)["problems"]:
        t_step, t_rec, t_ntk = time_problem(p["_problem"], args.repeats)
        print(f"| {p['_problem'].name} | {t_step:.1f} | {t_rec:.1f} | {t_ntk:.0f} |")


if __name__ == "__main__":
    main()
