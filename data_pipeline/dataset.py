"""A decoded, resized split (see cache.load_split) and the torch Dataset over it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import Crop, build_mixer, build_transform


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # uint8 [N, H, W]
    file_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.file_names)

    def concat(self, *others: "Split") -> "Split":
        """This split followed by others of the same classes (copied into memory)."""
        for other in others:
            if other.class_names != self.class_names:
                raise ValueError(f"cannot join splits with classes {other.class_names} and {self.class_names}")
        splits = (self, *others)
        return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.masks for s in splits]),
                     sum((s.file_names for s in splits), ()), self.class_names)

    def take(self, indices) -> "Split":
        """The images at indices (e.g. one fold), copied out of the memory map."""
        indices = np.asarray(indices, dtype=np.int64)
        masks = self.masks[indices] if len(self.masks) else self.masks
        return Split(self.images[indices], masks, tuple(self.file_names[i] for i in indices), self.class_names)


class SegmentationDataset(Dataset):
    """(image uint8 [H, W, 3], mask uint8 [H, W]) tensor pairs of a Split under an augmentation policy.

    In training, a policy with a mixing step (cutmix, copy_paste) first mixes the sample with a random
    partner of the split, then `crop` (augment.Crop) cuts the training patch, then the policy's
    albumentations transforms run; evaluation (train=False) only converts, whole images. Images stay uint8 HWC: models.inference.normalize converts whole batches on the device. Randomness comes from torch.initial_seed() of the process (set by torch.manual_seed,
    and per worker by the DataLoader), so runs are reproducible; the split is never written.
    """

    def __init__(self, split: Split, policy: str, *, train: bool, crop: Crop | None = None):
        self.split = split
        self.transform = build_transform(policy, train)
        self.mix = build_mixer(policy, train)
        self.crop = crop if train else None
        self.train = train
        self._seed: int | None = None
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image, mask = self.split.images[index], self._mask(index)
        if self.train:
            rng = self._generator()
            if self.mix is not None:
                partner = self._partner(index, rng)
                image, mask = self.mix(image, mask, self.split.images[partner], self._mask(partner), rng)
            if self.crop is not None:
                image, mask = self.crop(image, mask, rng)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        # np.require copies only what is still a view of the (read-only) split, or not contiguous.
        return tuple(torch.from_numpy(np.require(a, requirements=["C", "W"])) for a in (image, mask))

    def _mask(self, index: int) -> np.ndarray:
        if len(self.split.masks) == 0:
            return np.zeros(self.split.images.shape[1:3], np.uint8)
        # A copy: torch.from_numpy warns on read-only memory maps.
        return self.split.masks[index].copy()

    def _partner(self, index: int, rng: np.random.Generator) -> int:
        """A random other index (the same one only in a one-image split)."""
        if len(self) == 1:
            return index
        other = int(rng.integers(len(self) - 1))
        return other + (other >= index)

    def _generator(self) -> np.random.Generator:
        """The mixing RNG, with the transform reseeded alongside it, once per process or worker.

        albumentations draws from its own generators and ignores global seeds, so both are derived
        from torch.initial_seed(), which differs per DataLoader worker (and per epoch for
        non-persistent workers) and follows torch.manual_seed in the main process.
        """
        seed = torch.initial_seed()
        if seed != self._seed:
            mix_seed, transform_seed = np.random.SeedSequence(seed).generate_state(2)
            self._rng = np.random.default_rng(mix_seed)
            if self.transform is not None:
                self.transform.set_random_seed(int(transform_seed))
            self._seed = seed
        return self._rng


def make_loader(dataset: Dataset, batch_size: int, *, workers: int = 0, **options) -> DataLoader:
    """A DataLoader; with workers, batches reach the main process through torch's file_system
    sharing strategy (a shared-memory file name per batch instead of passing file descriptors): more
    samples/s than descriptor passing (bench/loader.py), and no descriptor limits."""
    if workers:
        torch.multiprocessing.set_sharing_strategy("file_system")
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, **options)
