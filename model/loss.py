"""Loss functions named by the config's `loss`; torch.nn classes and torch.nn.functional functions are found too."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def nll_loss(output, target):
    return F.nll_loss(output, target)


class CrossEntropy(nn.Module):
    """Cross-entropy with optional label smoothing and per-class weights given as a JSON list."""

    def __init__(self, weight=None, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, output, target):
        return F.cross_entropy(output, target, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_target)^gamma to focus on hard samples;
    `weight` is an optional per-class list (the alpha term)."""

    def __init__(self, gamma=2.0, weight=None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", None if weight is None else torch.tensor(weight, dtype=torch.float32))

    def forward(self, output, target):
        log_p = F.log_softmax(output.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()
