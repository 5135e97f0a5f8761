"""`python -m attent_scale` entry point."""

import sys

from attent_scale.cli import main

sys.exit(main())
