from setuptools import find_packages, setup

setup(
    name="paddle_pinn_balance",
    version="0.1.0",
    description="Loss balancing for physics-informed neural networks in PaddlePaddle "
    "(learning-rate annealing, NTK trace weighting, GradNorm)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["paddle_pinn_balance", "paddle_pinn_balance.*"]),
    python_requires=">=3.9",
    install_requires=["paddlepaddle>=3.0", "numpy", "pyyaml"],
    extras_require={
        "test": ["pytest", "matplotlib", "scipy"],
        "plot": ["matplotlib", "tqdm"],
        "ppsci": ["paddlesci"],
        "upgrad": ["scipy"],
    },
    entry_points={"console_scripts": ["pinn-balance=paddle_pinn_balance.cli:main"]},
)
