"""Cross-device negatives: the loss over every rank's batch of a process group (design 3)."""
