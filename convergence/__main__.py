"""``python -m convergence``: run the theory checks and the communication claim (see :mod:`convergence.check`)."""
import sys

from convergence.check import main

if __name__ == "__main__":
    sys.exit(main())
