"""Loss functions named by the config's `loss`; torch.nn classes and torch.nn.functional functions are found too.

A loss here marked `per_head = True` (like torch's) is applied to each head's columns of the output; any other takes
the model's whole output (tensor, tuple or dict) and the whole target (one per head with several label columns).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def nll_loss(output, target):
    return F.nll_loss(output, target)


nll_loss.per_head = True


class CrossEntropy(nn.Module):
    """Cross-entropy with optional label smoothing and per-class weights given as a JSON list."""

    per_head = True

    def __init__(self, weight=None, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", class_weights(weight))
        self.label_smoothing = label_smoothing

    def forward(self, output, target):
        return F.cross_entropy(output, target, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_target)^gamma to focus on hard samples;
    `weight` is an optional per-class list (the alpha term)."""

    per_head = True

    def __init__(self, gamma=2.0, weight=None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer("weight", class_weights(weight))

    def forward(self, output, target):
        log_p = F.log_softmax(output.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def class_weights(weight):
    """Per-class weights from a JSON list of numbers >= 0 (None: every class weighs 1)."""
    if weight is None:
        return None
    if not isinstance(weight, list) or not weight or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                            and 0 <= w < float("inf") for w in weight):
        raise ValueError(f"weight must be a list of finite numbers >= 0, one per class, got {weight!r}")
    return torch.tensor(weight, dtype=torch.float32)
