"""``python -m gunn.train.tracking sync RUN_DIR``: see `gunn.train.tracking.sync.main`."""

import sys

from gunn.train.tracking.sync import main

sys.exit(main())
