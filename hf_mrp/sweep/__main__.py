"""``python -m hf_mrp.sweep``: the same as `hf-mrp sweep`."""

import sys

from ..errors import MRPUserError
from .command import main

try:
    main()
except MRPUserError as error:
    sys.exit(f"hf-mrp sweep: error: {error}")
