"""--ema_decay D: an exponential moving average of the weights, the model that validation, best.pt and
inference use while the optimizer trains the online weights.

After optimizer step t (1, 2, ...): W_avg <- d W_avg + (1 - d) W, with d = min(D, (1 + t) / (10 + t)), so
the first steps do not weigh the random initialisation for thousands of steps (the warm-up of TensorFlow's
ExponentialMovingAverage). d is a function of the step alone, so a resumed run repeats the straight one.
Only parameters are averaged: the averaged copy shares the model's buffers (constant side-information
tables, which can be large), so it costs one more copy of the parameters and nothing else.
"""
import copy

import torch


class WeightAverage:
    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model, memo={id(b): b for b in model.buffers()}).requires_grad_(False).eval()
        self.online = list(model.parameters())
        self.averaged = list(self.model.parameters())

    def step_decay(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step):
        """Fold in the online weights after optimizer step `step` (counted from 1)."""
        torch._foreach_lerp_(self.averaged, self.online, 1.0 - self.step_decay(step))
