"""Optimizers named by the config's `optimizer`; torch.optim's classes are found too. The trainer gives an optimizer
whose `step` requires a closure (SAM here, torch's LBFGS) one that recomputes the loss and gradients of the batch.
"""
import torch


class SAM(torch.optim.SGD):
    """Sharpness-aware minimisation (Foret et al., 2021) around SGD: each step moves the weights up the gradient to
    the worst point within `rho`, takes the gradient there, moves back and takes SGD's step with that gradient.
    `adaptive` scales the move by each weight's size (ASAM). For another base optimizer, subclass it the same way.
    """

    def __init__(self, params, lr=0.01, rho=0.05, adaptive=False, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.defaults.update(rho=rho, adaptive=adaptive)
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)

    @torch.no_grad()
    def step(self, closure):
        """`closure()` recomputes the loss and its gradients (zeroed first) at the weights it is called at."""
        stepped = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not stepped:
            return None
        norm = torch.stack([((p.abs() if group["adaptive"] else 1) * p.grad).norm() for p, group in stepped]).norm()
        moves = []
        for p, group in stepped:
            move = (p.square() if group["adaptive"] else 1) * p.grad * (group["rho"] / (norm + 1e-12))
            p.add_(move)
            moves.append(move)
        with torch.enable_grad():
            loss = closure()
        for (p, _), move in zip(stepped, moves):
            p.sub_(move)
        super().step()
        return loss
