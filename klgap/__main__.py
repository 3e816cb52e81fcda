"""``python -m klgap``: the command line, so a launcher runs it as a module (``torchrun -m klgap replicate ...``)."""

import sys

from klgap.cli.main import main

sys.exit(main())
