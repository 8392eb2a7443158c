"""The dropout every encoder and the model's input use."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Dropout(nn.Module):
    """Inverted dropout; on CPU the mask comes from numpy's PCG64 bytes (seeded from torch's generator, so
    runs stay reproducible): one byte per element, so p is rounded to a multiple of 1/256 there.

    Why not nn.Dropout on CPU: its bernoulli_ mask was a large share of an epoch (figures in
    docs/performance.md, "Standard calls, and the three tricks that stay"). On CUDA it is F.dropout (no
    measured need there), which is also what torch.compile traces, as --compile acts on CUDA only."""

    PCG64_INCREMENT = 0xDA3E39CB94B95BDB  # any odd constant: the stream; each mask's state comes from torch

    def __init__(self, p):
        super().__init__()
        self.p = p
        # one bit generator, re-seeded per mask by setting its state: PCG64(seed)'s SeedSequence took ~35 us a
        # mask inside a training step (6% of a narrow step at pmixer's settings)
        self.bits = np.random.PCG64(0)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        drop = round(256 * self.p)  # the scale uses the exact keep rate
        self.bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                           "state": {"state": int(torch.randint(0, 2 ** 62, (1,))), "inc": self.PCG64_INCREMENT}}
        bits = self.bits.random_raw(-(-x.numel() // 8))
        keep = bits.view(np.uint8)[:x.numel()].reshape(x.shape) >= drop
        return x * torch.from_numpy(np.multiply(keep, np.float32(256 / (256 - drop)), dtype=np.float32)).to(x.dtype)
