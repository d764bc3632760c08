"""`python -m tests.zoo`: see tests/zoo/run.py."""

import sys

from .run import main

sys.exit(main())
