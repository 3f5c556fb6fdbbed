"""`python -m fmstack` (also under `torchrun -m fmstack`)."""

import sys

from fmstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
