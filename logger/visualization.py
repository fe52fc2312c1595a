"""TensorBoard output; TensorBoard is imported only when the config turns it on."""


class TensorboardWriter:
    """Writes scalars and image grids under `log_dir`; every call does nothing when disabled."""

    def __init__(self, log_dir, enabled):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def add_scalars(self, prefix, values, step):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def add_image_grid(self, tag, images, step):
        if self.writer:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images.float(), nrow=8, normalize=True), step)

    def close(self):
        if self.writer:
            self.writer.close()
