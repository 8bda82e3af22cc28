"""Where and how a run executes: devices and precision, torchrun's processes, CUDA graphs,
signals, and the run's log."""
