"""``python -m procpool top``: see ``procpool._top``."""

import sys

from ._top import main

sys.exit(main())
