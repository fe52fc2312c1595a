import copy

import torch


class ModelEma:
    """An exponential moving average of a model's weights (and a copy of its buffers), kept for evaluation."""

    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        averaged, current = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in averaged.items() if v.is_floating_point()]
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k].detach() for k in floats], 1 - self.decay)
        for key in averaged.keys() - set(floats):
            averaged[key].copy_(current[key])
