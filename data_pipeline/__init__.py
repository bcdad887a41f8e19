"""Data: COCO reading, validation, class maps, the decoded-split cache, splits, augmentation, sample data,
submissions."""
import os

# albumentations asks PyPI for a newer version at import, from every trial process: not wanted offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
