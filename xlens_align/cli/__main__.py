"""`python -m xlens_align.cli ...` runs the `xlens-align` command line."""

import sys

from . import main

sys.exit(main())
