"""``python -m qgraph.export MODEL -o DIR`` (the same as ``qgraph export``)."""

import sys

from qgraph.export.command import main

sys.exit(main())
