"""A training or evaluation job, from a built Config to its report: read the data, complete the config with
what the data gives, build model / loss / sampler / optimizer, restore or fine-tune from a checkpoint, own
the output folders, train (training/loop.py), report. main.py is the command line around run_job.
"""
import ctypes
import dataclasses
import os
import time

import numpy as np
import torch

import distributed
from cli import BF16_MATRIX_FLAGS, UsageError, amp_dtype, make_writable_folder
from config import (
    Config,
    DataConfig,
    TrainConfig,
    action_weights,
    attention_bias_kinds,
    checkpoint_file,
    with_output_dirs,
)
from dataset import DataError, Interactions, LeaveOneOut
from eval.metrics import evaluate, popularity_scorer
from files import FolderBusy, lock_folder, write_json
from model import SASRec
from objectives.losses import build_loss, popularity
from objectives.samplers import NegativeSampler
from readers import semantic_ids
from readers.features import SideInfo, load_side_info
from readers.logs import load_interactions
from readers.taac import load_taac
from training import checkpoint
from training.loop import LoopState, check_trainable, fit, run_evaluation
from training.optim import MuonAdamW, build_optimizer, check_same_optimizer, set_weight_decay
from training.weight_average import WeightAverage


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    Its default hands large blocks back to the OS and the next step faults them in again, zeroed; the
    softmax losses' chunk buffers are such blocks. It stays because an InfoNCE epoch was measurably slower
    without it (docs/performance.md); what PyTorch's CPU tuning guide gets from preloading jemalloc /
    tcmalloc. Returns whether it applied (not on macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))


def load_data(config: Config) -> tuple[Interactions, LeaveOneOut]:
    """The log and its leave-one-out split."""
    d = config.data
    cache_first = bool(d.cache_dir) and d.data != "synthetic" and distributed.world_size() > 1
    # under torchrun rank 0 parses and caches first; the others wait for its word (an error, or go), then map it
    data = on_rank0(lambda: read_data(d)) if cache_first else None
    data = read_data(d) if data is None else data
    single = np.flatnonzero(data.lengths == 1)
    if len(single) and d.single_item_users == "error":
        raise UsageError(f"{d.data}: {len(single)} user(s) with a single interaction, e.g. user "
                         f"{str(data.user_ids[single[0]])!r}: nothing to train or evaluate on (expected >= 2 per "
                         f"user; --single_item_users ignore skips them)")
    split = LeaveOneOut(data, config.eval.eval_actions)
    if len(split.eval_users) == 0:
        raise UsageError(f"{d.data}: no user has the 3 or more interactions that leave-one-out needs "
                         f"(one to train on, one to validate, one to test)")
    print(f"data {d.data}: {data.num_users} users, {data.num_items} items, {len(data.items)} interactions; "
          f"{len(split.eval_users)} users evaluated"
          + (f", {split.num_short_users} users with < 3 items used for training only" if split.num_short_users else ""))
    return data, split


def read_data(d: DataConfig) -> Interactions:
    """The log or competition folder of --data, through the parse cache; a data error is one UsageError."""
    try:
        if d.competition_folder:
            if d.action_col:  # a folder's events carry their own action_type
                raise DataError(f"--action_col is for delimited logs: the competition folder {d.data} has its "
                                f"own action types")
            return load_taac(d.data, d.cache_dir or None, d.mm_emb_id, d.item_feature_ids, d.user_feature_ids,
                             verify_cache=d.verify_cache, non_finite=d.non_finite)
        return load_interactions(d.data, d.data_format, d.cache_dir or None, d.user_col, d.item_col, d.time_col,
                                 d.id_type, verify_cache=d.verify_cache, action_col=d.action_col,
                                 action_threshold=d.action_threshold)
    except DataError as e:
        raise UsageError(str(e)) from None


def complete_config(config: Config, data: Interactions) -> tuple[Config, SideInfo]:
    """The config with the model's data-given fields: catalogue size, side-information shapes, action types.
    Every check of flags against the data is here (config.validate checks the flags alone). Returns (config,
    the item side information's arrays)."""
    d = config.data
    if data.item_side is not None and (d.item_features or d.item_emb):
        raise UsageError("--item_features / --item_emb are for log files: a competition folder brings its own item "
                         "features (--item_feature_ids, --mm_emb_id choose among them)")
    if d.mm_emb_id and data.item_side is None:
        raise UsageError("--mm_emb_id is for competition folders (--data DIR); for a log file use --item_emb FILE")
    try:
        side = data.item_side or load_side_info(data.item_ids, d.item_features, d.item_emb, d.feature_sep,
                                                d.non_finite)
    except DataError as e:
        raise UsageError(str(e)) from None
    if d.semantic_ids:
        side = semantic_side(config, data, side)
    if config.loss.align_side_info and not (side.features or side.vectors):
        raise UsageError(f"--align_side_info: {d.data} gives the items no side information (add --item_features, "
                         f"--item_emb or --mm_emb_id)")
    if "time" in attention_bias_kinds(config.model.attn_bias) and data.times is None:
        raise UsageError(f"--attn_bias time: {d.data} has no timestamps (a time column, or a competition folder); "
                         f"use --attn_bias position")
    num_actions = int(data.actions.max()) + 1 if data.actions is not None else 0
    if config.model.next_action and not num_actions:
        raise UsageError(f"--next_action: {d.data} has no action types (a competition folder, or --action_col)")
    if config.model.next_action and not 0 <= config.eval.predict_action < num_actions:
        raise UsageError(f"--predict_action {config.eval.predict_action}: {d.data} has action types "
                         f"0..{num_actions - 1}")
    model_config = dataclasses.replace(config.model, num_items=data.num_items, item_side=side.spec(),
                                       user_side=data.user_side.spec() if data.user_side is not None else None,
                                       num_actions=num_actions)
    return dataclasses.replace(config, model=model_config), side


def semantic_side(config: Config, data: Interactions, side: SideInfo) -> SideInfo:
    """--semantic_ids L K: `side` with the items' semantic-id features and quantiser (readers/semantic_ids.py),
    from the vectors of --mm_emb_id (competition folders) or --item_emb (logs); cached under --cache_dir."""
    d = config.data
    levels, k = d.semantic_ids
    mm_names = {f"mm_{m}" for m in d.mm_emb_id}  # a folder's other vectors are continual features, not embeddings
    families = [v for v in side.vectors if data.item_side is None or v.name in mm_names]
    if not families:
        raise UsageError(f"--semantic_ids: {d.data} gives the items no vectors (--mm_emb_id for competition "
                         f"folders, --item_emb for logs)")
    key = semantic_ids.cache_key(data.fingerprint, families, levels, k, config.train.seed,
                                 [] if data.item_side is not None else list(d.item_emb))

    def quantised():
        try:
            return semantic_ids.with_semantic_ids(side, families, levels, k, config.train.seed, d.cache_dir or None,
                                                  key)
        except ValueError as e:
            raise UsageError(f"--semantic_ids {levels} {k}: {e}") from None
    # under torchrun rank 0 runs k-means and caches it; the others then read the cache (as load_data's parse)
    first = on_rank0(quantised) if d.cache_dir and distributed.world_size() > 1 else None
    return first if first is not None else quantised()


def build(config: Config, side: SideInfo, split: LeaveOneOut, device: torch.device
          ) -> tuple[SASRec, torch.nn.Module, NegativeSampler, torch.optim.Optimizer | MuonAdamW]:
    """Model, loss, negative sampler and optimizer (training/optim.py, --optimizer) for a completed config."""
    model = SASRec(config.model)
    model.item_tower.load_arrays(side)
    model = model.to(device)
    counts = split.item_counts("valid")
    loss = build_loss(config.loss, counts, config.model.hidden_units, amp_dtype(device, config.train.amp)).to(device)
    popular = config.loss.loss == "sampled_softmax" and config.loss.neg_sampler == "popularity"
    probs = popularity(counts, config.loss.popularity_alpha).to(device) if popular else None
    sampler = NegativeSampler(config.model.num_items, probs, split)
    optimizer = build_optimizer(model, loss, config.train, device)
    return model, loss, sampler, optimizer


def prepare(config: Config, device: torch.device) -> tuple:
    """(completed config, data, split, model, loss, sampler, optimizer): a run before its first step."""
    data, split = load_data(config)
    config, side = complete_config(config, data)
    return (config, data, split, *build(config, side, split, device))


def restore(path: str, model: SASRec, loss: torch.nn.Module, optimizer: torch.optim.Optimizer | MuonAdamW,
            config: Config, trained_on: dict, average: WeightAverage | None = None) -> LoopState:
    """Load a checkpoint's weights (and loss, optimizer, weight average + loop state when resuming); returns
    the loop state. A resumed run trains on the optimizer's weights, not the averaged ones. Data other than
    the checkpoint's, or another --optimizer, is refused before anything is loaded."""
    t = config.train
    ckpt = checkpoint.load(path)
    saved, current = ckpt.get("data"), trained_on
    if t.allow_other_data and saved:  # the item ids must still match; the content may differ
        saved = {**saved, "fingerprint": current["fingerprint"]}
    checkpoint.check_same_data(saved, current, config.data.data, path, other_data_hints(t))
    checkpoint.check_model_config(ckpt, model.config, path)
    if not t.inference_only and "optimizer" in ckpt:
        check_same_optimizer(ckpt["optimizer"], t, path)
    online = not t.inference_only and "online_model" in ckpt
    checkpoint.restore_weights(model, ckpt, path, key="online_model" if online else "model")
    if average is not None:  # a checkpoint without an average (EMA switched on at resume) starts it there
        checkpoint.restore_weights(average.model, ckpt, path)
    if not t.inference_only:
        try:
            loss.load_state_dict(ckpt.get("loss", {}))
            optimizer.load_state_dict(ckpt["optimizer"])
            set_weight_decay(optimizer, t.weight_decay)  # the saved groups' value would beat --weight_decay
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UsageError(f"--state_dict_path {path}: does not fit this model ({type(e).__name__}: {e})") from None
    state = LoopState.from_checkpoint(ckpt)
    if not t.inference_only:
        check_resumable(state, t, path)
    print(f"loaded {path} (epoch {state.epoch}, step {state.step})")
    return state


def other_data_hints(train_config):
    """What to do instead, by what differs (checkpoint.check_same_data)."""
    if train_config.inference_only:
        return {"items": "evaluate it on its own data (eval/infer.py --queries scores any sequences by raw item id)",
                "content": "--allow_other_data evaluates it on this log anyway"}
    hint = "resume it on the data it was trained on, or start a new run from its weights with --finetune"
    return {"items": hint, "content": hint}


def check_resumable(state: LoopState, train_config: TrainConfig, path: str) -> None:
    """A finished run is not resumed (it would only rewrite its results), unless it ended at --num_epochs
    and more epochs are asked for; nor is a run asked for no epoch beyond those it has trained."""
    ended = {"early_stop": "stopped early", "decay": "ended its final learning-rate decay"}.get(state.finished)
    if ended:
        raise UsageError(f"--state_dict_path {path}: the run is finished ({ended} at epoch {state.epoch}): nothing "
                         f"to resume; --inference_only evaluates it")
    if train_config.num_epochs <= state.epoch:
        what = (f"the run is finished (trained its --num_epochs {state.epoch})" if state.finished else
                f"--num_epochs {train_config.num_epochs} asks for no epoch beyond the {state.epoch} trained")
        raise UsageError(f"--state_dict_path {path}: {what}: nothing to resume; --num_epochs N > {state.epoch} trains "
                         f"it on, --inference_only evaluates it")
    state.finished = ""


def finetune_from(path: str, model: SASRec, data: Interactions) -> None:
    """--finetune: the checkpoint's weights in a model built for `data`, items matched by raw id."""
    ckpt = checkpoint.load(path)
    checkpoint.check_model_config(ckpt, model.config, path, same_data=False)
    old_items = checkpoint.read_id_map(path, "--state_dict_path")["items"]
    checkpoint.check_id_map(ckpt.get("data"), old_items, "id_map.json", path)
    saved_codes = (ckpt.get("data") or {}).get("feature_codes")
    same_codes = saved_codes is None or saved_codes == data.feature_codes
    matched, fresh = checkpoint.transfer_weights(model, ckpt, old_items, data.item_ids, same_codes)
    print(f"fine-tuning from {path}: {matched} of {data.num_items} items matched by raw id, "
          f"{data.num_items - matched} new (untrained)"
          + (f"; left at their initialisation ({'feature codes mean other values, or ' if not same_codes else ''}"
             f"shape changed): {', '.join(fresh)}" if fresh else ""))


def describe_loss(c):
    """One line naming the loss and the settings that matter for it."""
    parts = [c.loss]
    if c.similarity == "cosine":
        parts.append(f"cosine / T={c.temperature:g}{' (learnt)' if c.learn_temperature else ''}")
    if c.loss in ("gbce", "sampled_softmax"):
        parts.append(f"{c.num_negatives} negatives")
    if c.loss == "gbce":
        parts.append(f"t={c.gbce_t:g}")
    if c.loss == "sampled_softmax" and c.negatives_per_position:
        parts.append("uniform, per position")
    elif c.loss == "sampled_softmax":
        in_batch, logq = " + in-batch" if c.in_batch_negatives else "", ", logQ" if c.logq_correction else ""
        parts.append(f"{c.neg_sampler}{in_batch}{logq}")
    if c.symmetric and c.loss == "infonce":
        parts.append("symmetric")
    if c.hard_negatives and c.loss in ("infonce", "sampled_softmax", "ce"):
        parts.append(f"{c.hard_negatives} hardest negatives")
    return ", ".join(parts)


def final_report(model: SASRec, split: LeaveOneOut, config: Config, device: torch.device, summary: dict) -> dict:
    """Test (and validation) metrics of the model next to the popularity baseline, printed and saved as JSON."""
    results = {"config": config.flat(), **summary}
    e = config.eval
    for which in ("valid", "test"):
        results[which] = run_evaluation(model, split, config, device, which)
        pop = popularity_scorer(split.item_counts(which))
        results[f"popularity_{which}"] = evaluate(pop, split, which, exclude_history=not e.keep_history,
                                                  sampled=e.sampled_metrics, seed=config.train.seed,
                                                  rare_below=e.rare_below,
                                                  score_weights=action_weights(e.score_weights, "score_weights"))
    keys = ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "score"]
    if "weighted_score" in results["test"]:
        keys.append("weighted_score")
    if e.sampled_metrics:
        keys += ["sampled_HR@10", "sampled_NDCG@10"]
    if "rare_HR@10" in results["test"]:
        keys += ["rare_HR@10", "rare_NDCG@10"]
    print(f"\ntest metrics ({results['test']['users']} users, full ranking"
          f"{', history kept' if e.keep_history else ', history excluded'}):")
    print(f"  {'metric':<16}{'SASRec':>10}{'popularity':>12}")
    for k in keys:
        print(f"  {k:<16}{results['test'][k]:>10.4f}{results['popularity_test'][k]:>12.4f}")
    if e.rare_below:
        print(f"  rare_*: the {results['test']['rare_users']} users whose test item was seen < {e.rare_below} "
              f"times before")
    path = os.path.join(config.output.run_dir, "eval_results.json" if config.train.inference_only else "results.json")
    write_json(path, results)
    print(f"results written to {path}")
    return results


def on_rank0(work):
    """Run `work` on rank 0 only and return its value there (None on the other ranks); if it raises
    UsageError, every rank raises it rather than waiting in the next collective for a rank that is gone."""
    message = result = None
    if distributed.is_main():
        try:
            result = work()
        except UsageError as e:
            message = str(e)
    message = distributed.broadcast(message)
    if message is not None:
        raise UsageError(message)
    return result


def check_not_overwriting(config):
    """A new run never replaces another run's checkpoints; resuming writes on into its own folder."""
    ckpt_dir, t = config.output.ckpt_dir, config.train
    last = os.path.join(ckpt_dir, "last.pt")
    resumed_from = t.state_dict_path and not t.finetune and \
        os.path.dirname(os.path.abspath(checkpoint_file(t.state_dict_path, False)))
    if os.path.exists(last) and resumed_from != os.path.abspath(ckpt_dir):
        raise UsageError(f"--ckpt_dir {ckpt_dir} already holds a run ({last}); resume it with --state_dict_path "
                         f"{ckpt_dir}, or choose another --run_dir / --ckpt_dir")


OUTPUT_FOLDERS = ("run_dir", "log_dir", "tb_dir", "ckpt_dir")


def own_output_folders(config):
    """Lock every output folder for this run's whole life, before anything is written in them: a second run
    or resume into the same folders is refused, naming the holder; a dead holder's lock is gone with it."""
    for name in OUTPUT_FOLDERS:
        folder = getattr(config.output, name)
        try:
            os.makedirs(folder, exist_ok=True)
            lock_folder(folder)
        except FolderBusy as e:
            raise UsageError(f"--{name} {folder}: in use by another run (pid {e.args[0] or 'unknown'}); wait for it "
                             f"to end, or choose another --run_dir") from None
        except OSError as e:
            raise UsageError(f"--{name} {folder}: not a writable folder ({e.strerror or e})") from None


def prepare_outputs(config):
    if config.train.inference_only:  # writes eval_results.json alone, atomically: a training run may go on
        for name in OUTPUT_FOLDERS:
            make_writable_folder(getattr(config.output, name), f"--{name}")
        return
    own_output_folders(config)
    check_not_overwriting(config)


def run_job(config: Config, device: torch.device) -> None:
    """Train (or, with --inference_only, evaluate) as `config` says, on `device`; rank 0 writes the outputs."""
    t, lo = config.train, config.loss
    if t.compile and device.type != "cuda":
        print(f"note: --compile acts on CUDA only; on {device} it does nothing")
    if t.amp != "none" and amp_dtype(device, t.amp) is None:
        print(f"note: --amp {t.amp}: this CPU has no native bf16 matrix instructions ({' / '.join(BF16_MATRIX_FLAGS)} "
              f"in /proc/cpuinfo), where bf16 is slower than fp32; training in fp32")
    if lo.gather_negatives and (distributed.world_size() == 1 or lo.loss not in ("infonce", "sampled_softmax")):
        print("note: --gather_negatives acts on infonce / sampled_softmax under torchrun with 2+ processes; "
              "here it does nothing")
    torch.manual_seed(t.seed)
    config, data, split, model, loss, sampler, optimizer = prepare(config, device)
    state, path = LoopState(), None
    trained_on = checkpoint.data_identity(data)  # once: id digests read every id
    if t.finetune:
        path = checkpoint_file(t.state_dict_path, True)  # the weights it serves (best.pt of a folder)
        finetune_from(path, model, data)
    average = WeightAverage(model, t.ema_decay) if t.ema_decay and not t.inference_only else None
    if t.state_dict_path and not t.finetune:
        path = checkpoint_file(t.state_dict_path, t.inference_only)
        state = restore(path, model, loss, optimizer, config, trained_on, average)
    if not t.inference_only:
        check_trainable(split, config)
    config = dataclasses.replace(config, output=distributed.broadcast(with_output_dirs(config).output))
    on_rank0(lambda: prepare_outputs(config))
    main_rank = distributed.is_main()
    if t.inference_only:
        if main_rank:
            final_report(model, split, config, device, {"checkpoint": path})
        return
    if main_rank:
        write_json(os.path.join(config.output.ckpt_dir, "config.json"), config.flat())
        id_map = os.path.join(config.output.ckpt_dir, "id_map.json")
        if not (state.step and os.path.exists(id_map)):  # a resume checked it is the same: left byte-identical
            write_json(id_map, {"items": data.item_ids.tolist(), "users": data.user_ids.tolist()})
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    print(f"training {sum(p.numel() for p in model.parameters())} parameters on {device}{processes}, "
          f"loss {describe_loss(lo)}, run dir {config.output.run_dir}")
    start = time.perf_counter()
    fit(model, loss, sampler, optimizer, split, config, device, state, average, trained_on)
    train_minutes = (time.perf_counter() - start) / 60
    if main_rank:
        best_path = os.path.join(config.output.ckpt_dir, "best.pt")
        if os.path.exists(best_path):
            model.load_state_dict(checkpoint.load(best_path)["model"])
        print(f"best validation NDCG@10 {state.best_ndcg:.4f} at epoch {state.best_epoch}; "
              f"training took {train_minutes:.1f} min")
        final_report(model, split, config, device, {"best_epoch": state.best_epoch,
                                                    "train_minutes": train_minutes, "checkpoint": best_path})
