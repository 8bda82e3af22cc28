"""`python -m torchmnist`: the same entry point as the `torchmnist` console script."""

import sys

from torchmnist.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
