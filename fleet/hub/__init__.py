"""The hub: cases, blobs, selection, labels, snapshots, model registry, rollouts, campaigns."""
