"""The optimizer of --optimizer: adam (the default, as SASRec trains), adamw, or muon.

muon: torch.optim.Muon on the encoder layers' hidden weight matrices (the 2-D weights of the linear layers
inside model.blocks: attention projections, feed-forward, HSTU's UVQK and output), AdamW on everything else
(embeddings, the position table, item / user towers, event context, LayerNorms, biases, relative attention
biases, the loss's parameters). Muon's update is orthogonalised (Newton-Schulz) and rescaled by
"match_rms_adamw" to AdamW's update RMS, so one --lr and --weight_decay serve both. The two run as one
object, MuonAdamW, that the loop, the lr schedule and checkpoints treat as the optimizer.
"""
from collections.abc import Callable

import torch
import torch.nn as nn

from cli import UsageError
from config import TrainConfig

BETAS = (0.9, 0.98)  # SASRec's Adam betas, for every optimizer here
MATRIX_LAYERS = (nn.Linear, nn.MultiheadAttention)  # a Conv1d(kernel 1) weight is 3-D: Muon refuses it, AdamW gets it


def hidden_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name in model: weight} of the 2-D weights of the linear layers inside model.blocks, what Muon trains."""
    matrices = {}
    for module_name, module in model.blocks.named_modules(prefix="blocks"):
        if isinstance(module, MATRIX_LAYERS):
            for name, p in module.named_parameters(recurse=False):
                if name.endswith("weight") and p.ndim == 2:  # not the biases
                    matrices[f"{module_name}.{name}"] = p
    return matrices


def split_parameters(model: nn.Module, loss: nn.Module
                     ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) (name, parameter) pairs: every parameter of model and loss in exactly one, in module
    order; the loss's names start with "loss."."""
    matrices = hidden_matrices(model)
    muon_ids = {id(p) for p in matrices.values()}
    seen, rest = set(muon_ids), []
    for name, p in [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]:
        if id(p) not in seen:  # a parameter shared by two modules is optimised once
            seen.add(id(p))
            rest.append((name, p))
    return list(matrices.items()), rest


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW stepped together as one optimizer: param_groups lists both
    optimizers' groups (the lr schedule sets every one), state_dict holds both states."""

    kind = "muon"

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        """Muon's groups then AdamW's: the optimizers' own dicts, so a change to one reaches its optimizer."""
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear both optimizers' gradients."""
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None) -> torch.Tensor | None:
        """One step of both (a closure is evaluated once); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        """{"kind": "muon", "muon": Muon's state dict, "adamw": AdamW's}."""
        return {"kind": self.kind, "muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load both states from state_dict(); another optimizer's state is a ValueError."""
        if not isinstance(state_dict, dict) or state_dict.get("kind") != self.kind:
            raise ValueError(f"not a {self.kind} optimizer state (saved by --optimizer {saved_kind(state_dict)})")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: nn.Module, loss: nn.Module, train_config: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer of --optimizer over model's and loss's parameters, with --lr and --weight_decay:
    torch.optim.Adam, torch.optim.AdamW or a MuonAdamW."""
    t, fused = train_config, device.type in ("cpu", "cuda")
    if t.optimizer == "adam":  # as before --optimizer existed: runs and checkpoints stay bit-identical
        return torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=t.lr, betas=BETAS, fused=fused)
    if t.optimizer == "adamw":
        named = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]
        return torch.optim.AdamW(decay_groups(named, t.weight_decay), lr=t.lr, betas=BETAS, fused=fused)
    if t.optimizer != "muon":
        raise ValueError(f"unknown optimizer {t.optimizer!r}")
    matrices, rest = split_parameters(model, loss)
    muon = torch.optim.Muon([p for _, p in matrices], lr=t.lr, weight_decay=t.weight_decay, momentum=0.95,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(decay_groups(rest, t.weight_decay), lr=t.lr, betas=BETAS, fused=fused)
    return MuonAdamW(muon, adamw)


def decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW's two groups: matrices and embedding tables decay; vectors (LayerNorm gains, biases, relative
    bias tables) and the loss's parameters (a learnt temperature would drift to 1) keep weight decay 0."""
    decay = [p.ndim >= 2 and not n.startswith("loss.") for n, p in named]
    decays = [p for (_, p), d in zip(named, decay, strict=True) if d]
    kept = [p for (_, p), d in zip(named, decay, strict=True) if not d]
    return [{"params": decays, "weight_decay": weight_decay},
            {"params": kept, "weight_decay": 0.0, "no_decay": True}]


def saved_kind(state_dict: dict | None) -> str:
    """The --optimizer that saved an optimizer state dict: MuonAdamW's names itself; AdamW's groups decouple
    their weight decay; Adam's (every checkpoint from before --optimizer) do not."""
    if isinstance(state_dict, dict) and "kind" in state_dict:
        return str(state_dict["kind"])
    groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
    return "adamw" if any(isinstance(g, dict) and g.get("decoupled_weight_decay") for g in groups) else "adam"


def check_same_optimizer(state_dict: dict | None, train_config: TrainConfig, path: str) -> None:
    """A run resumes with the optimizer it was trained with: another's state would not fit (or, Adam's in
    AdamW, would silently turn it back into Adam)."""
    saved = saved_kind(state_dict)
    if saved != train_config.optimizer:
        raise UsageError(f"--optimizer {train_config.optimizer}: the checkpoint {path} was trained with --optimizer "
                         f"{saved}; resume it with --optimizer {saved}, or start a new run from its weights with "
                         f"--finetune")


def set_weight_decay(optimizer: torch.optim.Optimizer | MuonAdamW, weight_decay: float) -> None:
    """--weight_decay into every group after a checkpoint's state was loaded (loading restores the saved
    groups' value, which would override a --weight_decay given at resume)."""
    for group in optimizer.param_groups:
        if not group.get("no_decay") and group["weight_decay"] != weight_decay:
            group["weight_decay"] = weight_decay
