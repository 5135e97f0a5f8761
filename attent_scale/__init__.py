"""attent_scale: AtteNT loss-based example selection for distributed transformer training."""

__version__ = "0.1.0"
