"""The training and evaluation loops the trainable runs, on a cached split of the sample data."""
import torch

from data_pipeline.cache import load_split
from data_pipeline.dataset import SegmentationDataset, make_loader
from models.factory import NORMALIZATION, build_model
from models.losses import build_loss
from models.training import evaluate, train_epoch


def test_training_lowers_the_loss_and_evaluation_reports_bounded_metrics(sample_root):
    torch.manual_seed(0)
    split = load_split(sample_root, "val.json", 64)
    num_classes = len(split.class_names)
    loader = make_loader(SegmentationDataset(split, "none", train=False), 8)
    model = build_model("Unet", "resnet18", num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = build_loss({"loss": "ce"})
    losses = [train_epoch(model, loader, loss_fn, optimizer, "cpu", NORMALIZATION) for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = evaluate(model, loader, num_classes, "cpu", NORMALIZATION)
    assert set(metrics) == {"val_miou", "val_pixel_acc", "val_loss"}
    assert 0 < metrics["val_miou"] <= 1 and 0 < metrics["val_pixel_acc"] <= 1 and metrics["val_loss"] > 0
