import torch.nn as nn


class BaseModel(nn.Module):
    """An nn.Module whose printout ends with its number of trainable parameters."""

    def forward(self, *inputs):
        raise NotImplementedError

    def __str__(self):
        n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{super().__str__()}\nTrainable parameters: {n_params:,}"
