"""``python -m simulator``: the codec demo (see :mod:`simulator.codec_demo`)."""

import sys

from .codec_demo import main

sys.exit(main())
