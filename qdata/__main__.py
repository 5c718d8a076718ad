"""``python -m qdata`` is the ``qdata`` command (see :mod:`qdata.cli`)."""
import sys

from qdata.cli import main

sys.exit(main())
