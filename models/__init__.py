"""Models: factory over segmentation-models-pytorch, losses, metrics, checkpoints, inference, ensembles."""
