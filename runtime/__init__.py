"""What keeps a run alive around the method: options, setup and resume, checkpoints and locks,
signals and exit status, progress, process groups, batch norm across processes, LARS."""
