"""TensorBoard output; TensorBoard is imported, and the event file created, only when something is written."""


class TensorboardWriter:
    """Writes scalars and image grids under `log_dir`; every call does nothing when disabled."""

    def __init__(self, log_dir, enabled):
        self.log_dir = log_dir
        self.enabled = enabled
        self.writer = None

    def _summary_writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
        return self.writer

    def add_scalars(self, prefix, values, step):
        if self.enabled:
            for name, value in values.items():
                self._summary_writer().add_scalar(f"{prefix}/{name}", value, step)

    def add_image_grid(self, tag, images, step):
        """A batch of images (N, C, H, W) as one grid, stretched to the batch's own value range; of images with
        an alpha channel (2 or 4 channels) the colour channels only."""
        if self.enabled:
            images = images[:, :3 if images.shape[1] >= 3 else 1].float()
            low, high = images.min(), images.max()
            images = (images - low) / (high - low).clamp(min=1e-5)
            self._summary_writer().add_images(tag, images, step, dataformats="NCHW")

    def close(self):
        if self.writer is not None:
            self.writer.close()
