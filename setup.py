import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "paddle_pinn_balance", "_version.py"), encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)  # the one version string

setup(
    name="paddle_pinn_balance",
    version=VERSION,
    description="Loss balancing for physics-informed neural networks in PaddlePaddle "
    "(learning-rate annealing, NTK trace weighting, GradNorm)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["paddle_pinn_balance", "paddle_pinn_balance.*"]),
    package_data={"paddle_pinn_balance": ["benchmarks/*.yaml"]},  # `pinn-balance run NAME` from any folder
    python_requires=">=3.9",
    install_requires=["paddlepaddle>=3.0", "numpy", "pyyaml"],
    extras_require={
        "test": ["pytest", "matplotlib", "scipy"],
        "plot": ["matplotlib", "tqdm"],
        "ppsci": ["paddlesci"],
        "docs": ["mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff"],  # ruff: signatures
        "upgrad": ["scipy"],
    },
    entry_points={"console_scripts": ["pinn-balance=paddle_pinn_balance.cli:main"]},
)
