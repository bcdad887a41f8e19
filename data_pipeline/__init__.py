"""Data: COCO reading, mask rasterisation, resized in-memory splits, augmentation, sample data, submissions."""
