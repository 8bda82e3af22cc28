"""The commands: `torchmnist train`'s flags and the other commands (test, predict, export,
report, bench, sweep, serve), each a thin layer over the training and inference code."""
