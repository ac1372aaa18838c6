"""``python -m dinov2_hf.cli``: the ``dinov2-hf`` command without the console script."""

import sys

from . import main

sys.exit(main())
