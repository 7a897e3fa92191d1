"""The demo simulator: a fleet with edge conditions, the whole loop, and a random-labeling control arm."""
