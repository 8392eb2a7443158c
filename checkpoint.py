"""Checkpoints: what one holds, how it is written (atomically, rank 0 only) and read (weights_only=True).

A checkpoint is a dict: format (FORMAT), model_config (config.ModelConfig as a dict: the model is
rebuilt from it alone), model / loss / optimizer state dicts and the loop state (train.LoopState's
fields: epoch, step, batch, rng, ...). "model" is always the weights to evaluate and serve: with
--ema_decay the averaged ones, and the optimizer's own then in "online_model" (what a resumed run trains
on). Checkpoints of other formats get a one-line error.
"""
import dataclasses

import torch

import distributed
from cli import UsageError, first_line
from config import STRUCTURE_KEYS
from files import atomic_write

FORMAT = 2  # 1 (no 'format' key): before the typed-config redesign; state-dict names changed with it


def save(path, model, loss, optimizer, loop_state, average=None):
    """Write a checkpoint atomically; under torchrun every rank holds the same weights and rank 0 writes.
    `average`: the run's WeightAverage (--ema_decay), whose weights become "model"."""
    if not distributed.is_main():
        return
    state = {"format": FORMAT, "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
             "loss": loss.state_dict(), "optimizer": optimizer.state_dict(), **dataclasses.asdict(loop_state)}
    if average is not None:
        state["model"], state["online_model"] = average.model.state_dict(), state["model"]
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load(path, flag="--state_dict_path"):
    """A checkpoint's dict; weights_only=True: a checkpoint is data, never code (pickled code is refused)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such checkpoint") from None
    except Exception as e:  # truncated, not a checkpoint, or unsafe content
        raise UsageError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UsageError(f"{flag} {path}: not a readable checkpoint (no model weights in it)")
    if checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format", 1)
        raise UsageError(f"{flag} {path}: checkpoint format {found} predates this version's format {FORMAT} "
                         f"(written before the typed-config redesign); retrain with this version, or use the "
                         f"commit that wrote it")
    return checkpoint


def check_model_config(checkpoint, model_config, path, flag="--state_dict_path"):
    """The model a run builds (or config.json describes) must be the one the checkpoint saved: its shape,
    catalogue and item tower."""
    saved = checkpoint["model_config"]
    for key in (*STRUCTURE_KEYS, "num_items", "no_item_id", "item_side", "user_side", "num_actions"):
        if saved.get(key) != getattr(model_config, key):
            raise UsageError(f"{flag} {path}: does not fit this model (the checkpoint's {key} = {saved.get(key)}, "
                             f"the config's {getattr(model_config, key)})")


def restore_weights(model, checkpoint, path, flag="--state_dict_path", key="model"):
    """Load a checkpoint's weights (`key`: "model", or "online_model" to resume) into `model`, or raise one
    line saying they do not fit."""
    try:
        model.load_state_dict(checkpoint[key])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"{flag} {path}: does not fit this model ({type(e).__name__}: {first_line(e)})") from None


def rng_state():
    """This process's torch random state; under torchrun a list of every rank's (a collective call)."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return distributed.gather_objects(mine) if distributed.world_size() > 1 else mine


def set_rng_state(saved):
    if isinstance(saved, list):  # one per rank (torchrun); the loop has checked the process count
        saved = saved[distributed.rank()]
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
