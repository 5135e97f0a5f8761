"""Helpers the launch scripts run with ``python -m``: ``attent_scale.ops.run_dir`` (the run_dir a train
command uses) and ``attent_scale.ops.targets`` (a Prometheus file_sd target file for a job)."""
