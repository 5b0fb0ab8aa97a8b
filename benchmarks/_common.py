"""What the cost benchmarks share: the thread count (import this module before paddle; ``--threads N`` on the
command line, default 1), the device (``--device``), the clock, and the amortised ratio of a step to a plain
one."""

import os
import statistics
import sys
import time


def _threads_from_argv() -> str:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "1"


for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_from_argv())


def add_device_argument(parser) -> None:
    """``--device NAME`` (``cpu``, ``gpu:0``, ...; default ``$PADDLE_PINN_BALANCE_DEVICE``, else Paddle's default:
    the GPU of a GPU build); :func:`use_device` applies it."""
    parser.add_argument("--device", default=os.environ.get("PADDLE_PINN_BALANCE_DEVICE") or None,
                        help="Paddle device (cpu, gpu:0, ...); default $PADDLE_PINN_BALANCE_DEVICE, else Paddle's")


def use_device(name) -> None:
    if name:
        import paddle

        paddle.set_device(name)


def clock() -> float:
    """CPU time of this process on the CPU (robust to other load on a shared machine), wall time on a GPU."""
    import paddle

    return time.perf_counter() if paddle.device.get_device().startswith("gpu") else time.process_time()


def amortised_ratio(update: list, other: list, freq: int) -> float:
    """``(median(update) + (freq - 1) * median(other)) / freq`` of per-step ratios to a plain step (the
    median of ``update`` alone at update_freq 1 or when no other step was timed)."""
    ratio = statistics.median(update)
    if freq > 1 and other:
        ratio = (ratio + (freq - 1) * statistics.median(other)) / freq
    return ratio
