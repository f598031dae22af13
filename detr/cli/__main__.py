"""`python -m detr.cli`: the same as the `detr` command."""

import sys

from detr.cli import main

sys.exit(main())
