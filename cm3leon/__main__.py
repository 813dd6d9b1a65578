"""``python -m cm3leon``: the ``cm3leon`` command line."""
import sys

from .cli import main

sys.exit(main())
