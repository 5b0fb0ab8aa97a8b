"""What the private ``paddle._C_ops`` forms of ``paddle_pinn_balance.ops`` buy: the same step benchmark with
the private ops and with their public twins (``PADDLE_PINN_BALANCE_PUBLIC_OPS=1``), alternated.

The choice is made once at import, so each form runs in its own process: ``benchmarks/step_overhead.py`` is
run ``--pairs`` times per form, the forms alternating (private, public, private, ...), and for every method
and update frequency the median ratio to the plain step (measured beside it in the same process) is
reported for both forms, with their quotient (public / private: above 1 means the private ops are faster).

    python benchmarks/public_ops.py                    # LRA, GradNorm, NTK grad_norm; 2 terms; freqs 1, 10
    python benchmarks/public_ops.py --terms 2 5 --freqs 1 10 100 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(public: bool, args, path: str) -> list:
    env = {**os.environ, "PADDLE_PINN_BALANCE_PUBLIC_OPS": "1" if public else "0"}
    cmd = [sys.executable, os.path.join(HERE, "step_overhead.py"), "--no-ppsci", "--json", path,
           "--rounds", str(args.rounds), "--block", str(args.block), "--terms", *map(str, args.terms),
           "--freqs", *map(str, args.freqs)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--terms", type=int, nargs="+", default=[2])
    p.add_argument("--freqs", type=int, nargs="+", default=[1, 10])
    p.add_argument("--pairs", type=int, default=2, help="processes per form (alternated)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    ratios = {False: {}, True: {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for public in ((False, True) if i % 2 == 0 else (True, False)):
                for row in run_once(public, args, os.path.join(tmp, "r.json")):
                    key = (row["terms"], row["method"], row["update_freq"])
                    ratios[public].setdefault(key, []).append(row["ratio"])
    rows = []
    print(f"{'terms':>5} {'method':<16}{'update_freq':>12}{'private':>9}{'public':>9}{'public/private':>16}")
    for key in sorted(ratios[False]):
        priv, pub = statistics.median(ratios[False][key]), statistics.median(ratios[True].get(key, [float("nan")]))
        rows.append(dict(terms=key[0], method=key[1], update_freq=key[2], private=priv, public=pub))
        print(f"{key[0]:>5} {key[1]:<16}{key[2]:>12}{priv:>9.3f}{pub:>9.3f}{pub / priv:>16.3f}")
    print("private / public: x plain (step time over a plain step timed beside it, step_overhead.py) with the "
          f"private ops and with the public ones; medians over {args.pairs} processes per form")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
