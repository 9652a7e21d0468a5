"""Mix-scale training: configuration, the loss, state I/O and the trainer."""
