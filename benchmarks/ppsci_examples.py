"""PaddleScience's own example scripts through ``examples/ppsci/upstream.py``: one process per (example,
balancer), then a table of the per-step cost and the example's own metric (``design/ppsci.md`` has the
session's numbers).

    git clone https://github.com/PaddlePaddle/PaddleScience
    python benchmarks/ppsci_examples.py PaddleScience/examples --out runs/ppsci_examples \\
        euler_beam:sum,lr_annealing,grad_norm,ntk,relobralo darcy2d:sum,lr_annealing

Budgets (below the examples' own) and the reference term of ``lr_annealing`` are in ``SPECS``. A finished
cell (``done.json``) is not run again. Per-step cost: the median over the Solver's log windows of their
mean ``batch_cost`` (the windows include the update steps).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: example -> (script under examples/, overrides, lr_annealing's ref, ntk's update_freq)
SPECS = {
    "euler_beam": ("euler_beam/euler_beam.py", ["TRAIN.epochs=1000", "TRAIN.eval_during_train=false", "log_freq=20"],
                   "biharmonic", 100),
    "laplace2d": ("laplace/laplace2d.py", ["TRAIN.epochs=200", "TRAIN.eval_during_train=false", "log_freq=20"],
                  "laplace", 20),
    "heat_pinn": ("heat_pinn/heat_pinn.py", ["TRAIN.epochs=300", "log_freq=20"], "laplace", 20),
    "darcy2d": ("darcy/darcy2d.py", ["TRAIN.epochs=100", "TRAIN.eval_during_train=false", "log_freq=10",
                                     "TRAIN.lbfgs.output_dir=@OUT@/lbfgs"], "poisson", 10),
    "biharmonic2d": ("biharmonic2d/biharmonic2d.py", ["TRAIN.epochs=60", "TRAIN.optimizer.lbfgs.max_iter=20",
                                                      "log_freq=10"], "biharmonic", 10),
}


def blocks(ref, freq):
    return {"sum": "{name: sum}", "lr_annealing": f"{{name: lr_annealing, ref: {ref}}}",
            "grad_norm": "{name: grad_norm}", "ntk": f"{{name: ntk, update_freq: {freq}}}",
            "relobralo": "{name: relobralo}"}


def parse(log):
    text = open(log).read()
    train = [line for line in text.splitlines() if "[Train]" in line]
    costs = [float(c) for line in train[1:] for c in re.findall(r"batch_cost: ([0-9.]+)s", line)]
    metrics = [line.split("[Eval][Avg]")[1].strip() for line in text.splitlines() if "[Eval][Avg]" in line]
    metrics += ["FDM MSE " + m for m in re.findall(r"between the FDM and PINN is ([0-9.e+-]+)", text)]
    return {"cost": statistics.median(costs) if costs else None, "metric": metrics[-1] if metrics else None,
            "last_train": re.sub(r"\x1b\[[0-9;]*m", "", train[-1]) if train else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", help="the examples/ folder of a PaddleScience checkout")
    parser.add_argument("--out", default="runs/ppsci_examples")
    parser.add_argument("cells", nargs="+", help="EXAMPLE:balancer,balancer,... (examples: %s)" % ", ".join(SPECS))
    args = parser.parse_args(argv)
    for cell in args.cells:
        ex, names = cell.split(":")
        script, overrides, ref, freq = SPECS[ex]
        for name in names.split(","):
            out = os.path.abspath(os.path.join(args.out, ex, name))
            if not os.path.exists(os.path.join(out, "done.json")):
                os.makedirs(out, exist_ok=True)
                cmd = [sys.executable, os.path.join(ROOT, "examples", "ppsci", "upstream.py"),
                       os.path.join(os.path.abspath(args.examples), script), "--balancer", blocks(ref, freq)[name],
                       "--out", out] + [o.replace("@OUT@", out) for o in overrides]
                t = time.time()
                p = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
                with open(os.path.join(out, "stdout.txt"), "w") as f:
                    f.write(p.stdout + p.stderr)
                with open(os.path.join(out, "done.json"), "w") as f:
                    json.dump({"rc": p.returncode, "wall_s": time.time() - t, "cmd": cmd}, f)
            row = {"example": ex, "balancer": name, **json.load(open(os.path.join(out, "done.json")))}
            for log in ("train.log", os.path.join("lbfgs", "train.log")):
                if os.path.exists(os.path.join(out, log)):
                    row[log] = parse(os.path.join(out, log))
            first = row.get("train.log", {})
            print(f"{ex:13s} {name:13s} rc {row['rc']} s/step {first.get('cost')} | {first.get('metric')}"
                  + (f" | L-BFGS: {row['lbfgs/train.log']['metric']}" if "lbfgs/train.log" in row else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
