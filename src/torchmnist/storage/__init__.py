"""What torchmnist keeps on disk: files written whole or not at all, run folders and their lock,
and checkpoints (written, and loaded safely from files that may be damaged or crafted)."""
