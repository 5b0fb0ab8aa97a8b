"""``python -m paddle_pinn_balance demo``: see :mod:`paddle_pinn_balance.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
