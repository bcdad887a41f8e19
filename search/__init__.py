"""Search: space parsing and validation, the trial trainable, Ray Tune wiring, experiment reading."""
