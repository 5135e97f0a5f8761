"""`python -m attent_scale` entry point."""

from attent_scale.cli import run

run()
