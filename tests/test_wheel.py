"""The release: a wheel installed into a fresh environment works from an empty folder.

``python -m build`` makes the wheel (CI builds it first and passes it in ``PADDLE_PINN_BALANCE_WHEEL``; else
this test builds it, and skips when the ``build`` package is missing). A new virtual environment (no system
or shared site-packages) installs it with its dependencies (PaddlePaddle: ~200 MB the first time, from pip's
cache after), then, from an empty folder, with no ``PYTHONPATH``: the version is the checkout's,
``pinn-balance demo --iters 20`` and ``pinn-balance run helmholtz2d --iters 5`` (a shipped benchmark by name)
succeed and write their results, and an unknown name lists the shipped ones.
"""

import glob
import json
import os
import subprocess
import sys
import venv
import zipfile

import pytest

import paddle_pinn_balance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.basename(p)
                 for p in glob.glob(os.path.join(ROOT, "paddle_pinn_balance", "benchmarks", "*.yaml")))


def _wheel(tmp_path) -> str:
    given = os.environ.get("PADDLE_PINN_BALANCE_WHEEL")
    if given:
        return os.path.abspath(given)  # the suite runs from the checkout; the installs from an empty folder
    pytest.importorskip("build", reason="python -m build needs the `build` package")
    out = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), ROOT],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = glob.glob(str(out / "*.whl"))
    return wheel


def _run(args, cwd, env, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_runs_from_an_empty_folder(tmp_path):
    wheel = _wheel(tmp_path)
    assert os.path.basename(wheel).startswith(f"paddle_pinn_balance-{paddle_pinn_balance.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"paddle_pinn_balance/benchmarks/{f}" for f in SHIPPED} <= names and len(SHIPPED) == 8
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)  # no --system-site-packages: nothing of this checkout's venv
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", wheel], empty, env, timeout=1200)
    assert rc == 0, err[-3000:]

    rc, out, err = _run([str(bin_dir / "python"), "-c", "import paddle_pinn_balance as p; print(p.__version__); "
                         "print(p.__file__)"], empty, env)
    assert rc == 0, err[-3000:]
    version, location = out.split()
    assert version == paddle_pinn_balance.__version__
    assert str(env_dir) in location and ROOT not in location  # the installed copy, not the checkout

    rc, out, err = _run([str(bin_dir / "pinn-balance"), "demo", "--iters", "20", "--out", "demo"], empty, env)
    assert rc == 0, err[-3000:]
    demo = json.loads((empty / "demo" / "results.json").read_text())
    assert sorted(demo["methods"]) == ["lra", "plain"]

    rc, out, err = _run([str(bin_dir / "pinn-balance"), "run", "helmholtz2d", "--iters", "5", "--quiet"], empty, env)
    assert rc == 0, err[-3000:]
    run = json.loads((empty / "runs" / "helmholtz2d" / "results.json").read_text())
    assert "lra" in run["methods"] and all(m["history"]["step"][-1] == 4 for m in run["methods"].values())

    rc, out, err = _run([str(bin_dir / "pinn-balance"), "run", "helmholtz3d"], empty, env)
    assert rc == 2 and "helmholtz2d" in err and "wave1d_small" in err, err
    assert sorted(os.listdir(empty)) == ["demo", "runs"]  # nothing else written
