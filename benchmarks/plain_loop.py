"""The fastest honest hand-written loop for data that fits in memory: the baseline that benchmark.py times train.py
against. Run from the repository root: python -m benchmarks.plain_loop -c config.json [--model resnet18]."""
import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import resize

RESNET_SIZE = [64, 64]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", default="config.json")
    parser.add_argument("--model", choices=("config", "resnet18"), default="config")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-batches", type=int, default=0, help="batches per epoch (0: all)")
    parser.add_argument("--val-batches", type=int, default=0, help="validation batches per epoch (0: all)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def load_images(data_dir, rgb):
    """Every training image of `data_dir` decoded into one uint8 tensor (N, C, H, W), and the labels."""
    with open(Path(data_dir) / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mode = ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED
    images = torch.stack([decode_image(read_file(str(Path(data_dir) / "train" / f"{r['id']}.png")), mode=mode)
                          for r in rows])
    classes = sorted({r["label"] for r in rows})
    labels = torch.tensor([classes.index(r["label"]) for r in rows])
    return images, labels


def prepare_images(data_dir, model_name):
    """The training images as one uint8 tensor, as RGB resized once to 64x64 for resnet18; and the labels."""
    images, labels = load_images(data_dir, rgb=model_name == "resnet18")
    return (resize(images, RESNET_SIZE, antialias=True) if model_name == "resnet18" else images), labels


def per_channel(values, channels, device="cpu"):
    """The config's mean or std as a (1, C, 1, 1) tensor; a single value serves every channel."""
    return torch.tensor(values * channels if len(values) == 1 else values, device=device).view(1, -1, 1, 1)


def build_model(config, model_name):
    """The config's model, built as train.py builds it for the default config, or torchvision's resnet18."""
    if model_name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    import model.model

    return getattr(model.model, config["arch"]["type"])(**config["arch"]["args"])


def normalise(batch, mean, std):
    return (batch.float().div_(255) - mean) / std


def evaluate(model, images, labels, batches, mean, std):
    """Validation loss and accuracy over `batches` (lists of indices)."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    with torch.no_grad():
        for idx in batches:
            output = model(normalise(images[idx], mean, std))
            loss_sum += F.cross_entropy(output, labels[idx], reduction="sum")
            correct += (output.argmax(1) == labels[idx]).sum()
    n = sum(len(idx) for idx in batches)
    return loss_sum.item() / n, correct.item() / n


def main(argv=None):
    args = parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    loader_args, device = config["data_loader"]["args"], torch.device(args.device)
    torch.manual_seed(config.get("seed", 0))
    images, labels = prepare_images(loader_args["data_dir"], args.model)
    images, labels = images.to(device), labels.to(device)
    mean, std = (per_channel(loader_args[key], images.shape[1], device) for key in ("mean", "std"))

    order = torch.randperm(len(images), device=device)
    n_valid = round(len(images) * loader_args["validation_split"])
    valid_idx, train_idx = order[:n_valid], order[n_valid:]
    batch_size = loader_args["batch_size"]
    valid_batches = list(valid_idx.split(batch_size))[:args.val_batches or None]
    n_train_batches = min(math.ceil(len(train_idx) / batch_size), args.train_batches or math.inf)

    model = build_model(config, args.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), **config["optimizer"]["args"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, total_steps=args.epochs * n_train_batches,
                                                    **config["lr_scheduler"]["args"])
    save_dir = tempfile.TemporaryDirectory(prefix="plain-loop-")
    last = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        shuffled = train_idx[torch.randperm(len(train_idx), device=device)]
        for idx in list(shuffled.split(batch_size))[:n_train_batches]:
            loss = F.cross_entropy(model(normalise(images[idx], mean, std)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        val_loss, val_accuracy = evaluate(model, images, labels, valid_batches, mean, std)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{save_dir.name}/last.pth")
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        print(f"epoch {epoch}/{args.epochs}  loss {loss_sum.item() / n_train_batches:.4f}  val_loss {val_loss:.4f}  "
              f"val_accuracy {val_accuracy:.4f}  ({now - last:.4f} s)", flush=True)
        last = now
    save_dir.cleanup()


if __name__ == "__main__":
    main()
