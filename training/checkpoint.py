"""Checkpoints: what one holds, how it is written (atomically, rank 0 only) and read (weights_only=True).

A checkpoint is a dict: format (FORMAT), model_config (config.ModelConfig as a dict: the model is
rebuilt from it alone), model / loss / optimizer state dicts, the loop state (train.LoopState's
fields: epoch, step, batch, rng, ..., finished) and "data": what it was trained on (data_identity), so
that data changed under a checkpoint is refused instead of silently pointing the weights at other items.
"model" is always the weights to evaluate and serve: with --ema_decay the averaged ones, and the
optimizer's own then in "online_model" (what a resumed run trains on). Checkpoints of other formats get a
one-line error.
"""
import dataclasses
import hashlib
import json
import os
import re

import torch

import distributed
from cli import RunError, UsageError, first_line
from config import STRUCTURE_KEYS, ModelConfig
from files import atomic_write
from readers.semantic_ids import feature_names

FORMAT = 2  # 1 (no 'format' key): before the typed-config redesign; state-dict names changed with it


def save(path: str, model, loss, optimizer, loop_state, average=None, data: dict | None = None) -> None:
    """Write a checkpoint atomically; under torchrun every rank holds the same weights and rank 0 writes.
    `average`: the run's WeightAverage (--ema_decay), whose weights become "model"; `data`: data_identity().
    A failed write (a full disk) is a RunError naming the file; the previous checkpoint stays as it was."""
    if not distributed.is_main():
        return
    state = {"format": FORMAT, "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
             "loss": loss.state_dict(), "optimizer": optimizer.state_dict(), "data": data,
             **dataclasses.asdict(loop_state)}
    if average is not None:
        state["model"], state["online_model"] = average.model.state_dict(), state["model"]
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise RunError(f"cannot write the checkpoint {path} ({first_line(e)}); the previous one is intact, "
                       f"resume from it once there is room") from None


def read_id_map(weights_path: str, flag: str) -> dict:
    """The id_map.json ({"items": [...], "users": [...]}) of the run folder holding `weights_path`."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "id_map.json")
    try:
        with open(path, encoding="utf-8") as f:
            id_map = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{flag} {weights_path}: no id_map.json beside it (expected a folder written by "
                         f"main.py)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {weights_path}: unreadable {path} ({e})") from None
    if not isinstance(id_map, dict) or not isinstance(id_map.get("items"), list):
        raise UsageError(f"{path}: expected a JSON object with an 'items' list")
    return id_map


def id_digest(ids) -> str:
    """SHA-256 of a list of raw ids, in order: equal digests mean the same index -> raw id map."""
    h = hashlib.sha256()
    for start in range(0, len(ids), 1 << 16):
        h.update("\n".join(map(str, ids[start:start + (1 << 16)])).encode() + b"\n")
    return h.hexdigest()


def data_identity(data) -> dict:
    """What a checkpoint records of its data (dataset.Interactions): the content fingerprint of the file or
    folder (with its parse settings), digests of the item and user id maps, and (competition folders) of
    the feature-value map."""
    return {"fingerprint": data.fingerprint, "items": int(data.num_items), "items_sha256": id_digest(data.item_ids),
            "users": int(data.num_users), "users_sha256": id_digest(data.user_ids),
            "feature_codes": data.feature_codes}


def check_same_data(saved: dict | None, current: dict, data_path: str, path: str, hints: dict) -> None:
    """Refuse, in one line saying what differs, data other than the checkpoint's. `saved`: the checkpoint's
    "data" (None in checkpoints older than it: nothing to compare); `current`: data_identity() of the data
    read now; `hints`: what the user can do instead, {"items": ..., "content": ...} by what differs."""
    if not saved:
        return
    if saved["items_sha256"] != current["items_sha256"]:
        what, hint = (f"its item ids differ from the checkpoint's ({saved['items']} items then, {current['items']} "
                      f"now)"), hints["items"]
    elif saved["fingerprint"] != current["fingerprint"]:
        what, hint = "its content differs from the data the checkpoint was trained on (same item ids)", hints["content"]
    else:
        return
    raise UsageError(f"--data {data_path}: {what}, so the weights of {path} would score other data; {hint}")


def check_id_map(saved: dict | None, items: list, id_map_path: str, path: str) -> None:
    """id_map.json beside a checkpoint must be the map the checkpoint was trained with."""
    if saved and id_digest(items) != saved["items_sha256"]:
        raise UsageError(f"{id_map_path}: not the item id map {path} was trained with ({len(items)} items; the "
                         f"checkpoint's has {saved['items']}): was the folder's id_map.json replaced?")


# Tensors indexed by item (row i = item i): carried over row by row, matched by raw id.
ITEM_ROWS = re.compile(r"(item|output)_tower\.id_emb\.weight")
# The item tower's side-information buffers come from the new data, never from the checkpoint.
SIDE_BUFFERS = re.compile(r"item_tower\.((feature_values|vectors|has_vector)\d+|semantic_codebooks)")


# Embeddings of feature codes: they mean the same values only under the same indexer feature-value map.
FEATURE_TABLES = re.compile(r"(item_tower\.feature_emb|user_tower\.emb)\.\d+\.weight")


@torch.no_grad()
def transfer_weights(model: torch.nn.Module, checkpoint: dict, old_items, new_items,
                     same_feature_codes: bool = True) -> tuple[int, list[str]]:
    """Copy a checkpoint's weights into `model`, built for other data (--finetune): item rows matched by raw
    id (new items keep their initialisation), every other tensor whose shape is unchanged; feature-code
    embeddings only where the codes mean the same values (`same_feature_codes`). Returns (items matched,
    names of the tensors left at their initialisation)."""
    old_row = {str(raw): i + 1 for i, raw in enumerate(old_items)}
    rows = torch.tensor([old_row.get(str(raw), 0) for raw in new_items], dtype=torch.long)
    matched = rows > 0
    state, saved, fresh = model.state_dict(), checkpoint["model"], []
    other_centroids = semantic_tables(model, saved)
    for name, tensor in state.items():
        old = saved.get(name)
        if SIDE_BUFFERS.fullmatch(name):
            continue
        if (not same_feature_codes and FEATURE_TABLES.fullmatch(name)) or name in other_centroids:
            fresh.append(name)
        elif old is not None and ITEM_ROWS.fullmatch(name) and old.shape[1:] == tensor.shape[1:]:
            tensor[1:][matched] = old[rows[matched]].to(tensor.dtype)
        elif old is not None and old.shape == tensor.shape:
            tensor.copy_(old)
        else:
            fresh.append(name)
    model.load_state_dict(state)
    return int(matched.sum()), fresh


def semantic_tables(model: torch.nn.Module, saved: dict) -> set:
    """Names of the model's --semantic_ids code embeddings when the checkpoint's codebooks differ from the
    model's (k-means of other data: a code names another centroid); empty otherwise."""
    spec = getattr(getattr(model, "config", None), "item_side", None) or {}
    if "semantic_ids" not in spec:
        return set()
    old, new = saved.get("item_tower.semantic_codebooks"), model.item_tower.semantic_codebooks
    if old is not None and old.shape == new.shape and torch.equal(old, new):
        return set()
    names = set(feature_names(spec["semantic_ids"]["levels"]))
    return {f"item_tower.feature_emb.{i}.weight" for i, f in enumerate(spec["features"]) if f["name"] in names}


def load(path: str, flag: str = "--state_dict_path") -> dict:
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


def check_model_config(checkpoint, model_config, path, flag="--state_dict_path", same_data=True):
    """The model a run builds (or config.json describes) must be the one the checkpoint saved: its shape,
    catalogue and item tower (`same_data=False`, --finetune: its shape alone)."""
    saved = checkpoint["model_config"]
    data_keys = ("num_items", "item_side", "user_side", "num_actions") if same_data else ()
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key in (*STRUCTURE_KEYS, "no_item_id", *data_keys):
        was = saved.get(key, defaults[key])  # a key older checkpoints lack: they were built with its default
        if was != getattr(model_config, key):
            raise UsageError(f"{flag} {path}: does not fit this model (the checkpoint's {key} = {was}, "
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
