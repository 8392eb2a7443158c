"""Train and evaluate SASRec: `python main.py --config configs/beauty.toml [--flag value ...]`.

Configuration flows one way: config file -> argparse defaults -> command-line flags.
The resolved config is written beside every checkpoint, so evaluation and inference
never need the training flags again.
"""
import argparse
import ctypes
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import distributed
from cli import ArgumentParser, fail, first_line, make_writable_folder, run
from dataset import (FORMATS, ID_TYPES, DataError, LeaveOneOut, TrainBatches, atomic_write, load_interactions,
                     remove_stale_temp_files)
from eval.metrics import evaluate, model_scorer, popularity_scorer
from features import load_side_info
from losses import LOSSES, SOFTMAX_LOSSES, TEMPERATURE_RANGE, Objective
from model import SASRec

ROOT = os.path.dirname(os.path.abspath(__file__))
KEY_ALIASES = {"infonce_temperature": "temperature"}  # old config keys still accepted
LOG_EVERY = 20  # training steps between TensorBoard points
# Flags that fix the network's shape: a checkpoint can only be loaded into a model built with the same values.
STRUCTURE_KEYS = ("maxlen", "hidden_units", "num_blocks", "num_heads", "norm_first", "output_emb")


def build_parser():
    p = ArgumentParser(description="Train / evaluate a SASRec sequential recommender.", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML file whose keys are these flags' names; command-line flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="interaction log path, or 'synthetic' for the embedded default")
    g.add_argument("--data_format", choices=FORMATS, help="lines: 'user i1 i2 ...'; pairs: 'user item' per line; "
                   "delimited: CSV/TSV/RecBole .inter with a header (default: detect)")
    g.add_argument("--user_col", help="delimited format: user column name (default: detect)")
    g.add_argument("--item_col", help="delimited format: item column name (default: detect)")
    g.add_argument("--time_col", help="delimited format: timestamp column name (default: detect, optional)")
    g.add_argument("--id_type", choices=ID_TYPES, default="auto",
                   help="raw ids: int, str, or auto (a column of mostly integers is an integer column, and a "
                        "non-integer in it is an error)")
    g.add_argument("--single_item_users", choices=("error", "ignore"), default="error",
                   help="users with one interaction give nothing to train or evaluate on: stop with an error, "
                        "or ignore them (the SASRec paper's Games file has 30)")
    g.add_argument("--cache_dir", default=os.environ.get("SASREC_CACHE_DIR", os.path.join(ROOT, ".cache")),
                   help="parsed logs are cached here, keyed by the file's content hash ('' disables)")
    g = p.add_argument_group("item side information (see features.py)")
    g.add_argument("--item_features", action="append", metavar="FILE",
                   help="item attributes: JSON {item: [values]} or a delimited file with an item column and one "
                        "column per feature (repeatable)")
    g.add_argument("--feature_sep", default="|", help="separator of multi-valued cells in --item_features")
    g.add_argument("--item_emb", action="append", metavar="FILE",
                   help="frozen pretrained item vectors: .npz (ids, vectors) or .npy with <name>.ids.txt (repeatable)")
    g.add_argument("--no_item_id", action="store_true", help="items from side information only (cold-start tower)")
    g = p.add_argument_group("model")
    g.add_argument("--maxlen", type=int, default=50, help="longest input sequence (most recent items kept)")
    g.add_argument("--hidden_units", type=int, default=50)
    g.add_argument("--num_blocks", type=int, default=2)
    g.add_argument("--num_heads", type=int, default=1)
    g.add_argument("--dropout_rate", type=float, default=0.2)
    g.add_argument("--norm_first", action=argparse.BooleanOptionalAction, default=True,
                   help="pre-norm blocks (--no-norm_first: post-norm)")
    g.add_argument("--output_emb", choices=("tied", "separate"), default="tied",
                   help="item table the states are scored against: the input table (tied, as in SASRec) or one "
                        "of its own (trains faster; README)")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.001)
    g.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay from --lr to 0 over --num_epochs (a function of the step, so resumable)")
    g.add_argument("--num_epochs", type=int, default=200)
    g.add_argument("--l2_emb", type=float, default=0.0, help="weight of the item-embedding norm penalty")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs")
    g.add_argument("--patience", type=int, default=5, help="stop after N validations without a better NDCG@10")
    g.add_argument("--state_dict_path", help="checkpoint (.pt, or a checkpoint dir) to resume from or evaluate")
    g.add_argument("--inference_only", action="store_true", help="evaluate --state_dict_path and exit")
    g = p.add_argument_group("loss (see losses.py)")
    g.add_argument("--loss", choices=LOSSES, help="default: bce, or infonce with --use_infonce")
    g.add_argument("--use_infonce", action=argparse.BooleanOptionalAction, default=False,
                   help="shortcut for --loss infonce: masked in-batch InfoNCE on cosine logits")
    g.add_argument("--similarity", choices=("dot", "cosine"),
                   help="logits (and ranking): dot product, or cosine / temperature (default: cosine for "
                        "infonce, dot otherwise)")
    g.add_argument("--temperature", "--infonce_temperature", dest="temperature", type=float, default=0.1,
                   help="divides cosine logits")
    g.add_argument("--learn_temperature", action=argparse.BooleanOptionalAction, default=False,
                   help=f"learn the temperature (log-parameterised, clamped to {list(TEMPERATURE_RANGE)}), "
                        "starting from --temperature")
    g.add_argument("--num_negatives", type=int, default=256, help="negatives per batch (sampled_softmax) or per sequence (gbce)")
    g.add_argument("--neg_sampler", choices=("uniform", "popularity"), default="uniform",
                   help="sampled_softmax: how negatives are drawn (gbce is always uniform)")
    g.add_argument("--logq_correction", action=argparse.BooleanOptionalAction, default=True,
                   help="sampled_softmax: subtract log(expected count in the pool) from every logit")
    g.add_argument("--in_batch_negatives", action=argparse.BooleanOptionalAction, default=False,
                   help="sampled_softmax: the batch's positives join the pool (accidental hits masked)")
    g.add_argument("--gbce_t", type=float, default=0.75, help="gbce: calibration t in [0, 1] (0 = plain BCE)")
    g.add_argument("--hard_negatives", type=int, default=0,
                   help="softmax losses: keep each row's K highest-scoring negatives (0: all)")
    g.add_argument("--gather_negatives", action=argparse.BooleanOptionalAction, default=False,
                   help="infonce / sampled_softmax under torchrun: the pool holds every rank's negatives "
                        "(gradients flow back through the gather), N ranks -> an N times larger pool")
    g = p.add_argument_group("GPU fast path (CUDA only: on CPU these are accepted and do nothing)")
    g.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16: autocast the forward pass to bfloat16 (losses are still computed in fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training step; falls back to eager if compilation fails")
    g = p.add_argument_group("evaluation")
    g.add_argument("--keep_history", action="store_true", help="let already-seen items compete in the ranking")
    g.add_argument("--rare_below", type=int, default=0,
                   help="also report metrics on targets seen in training fewer than N times (rare_* keys)")
    g.add_argument("--sampled_metrics", action=argparse.BooleanOptionalAction, default=False,
                   help="also report metrics against 100 random negatives (SASRec paper protocol)")
    g = p.add_argument_group("output (defaults: env TRAIN_LOG_PATH / TRAIN_TF_EVENTS_PATH / TRAIN_CKPT_PATH, "
                             "else folders of --run_dir)")
    g.add_argument("--run_dir", help="default: runs/<data>_<loss>_<time>")
    g.add_argument("--log_dir", default=os.environ.get("TRAIN_LOG_PATH"))
    g.add_argument("--tb_dir", default=os.environ.get("TRAIN_TF_EVENTS_PATH"))
    g.add_argument("--ckpt_dir", default=os.environ.get("TRAIN_CKPT_PATH"))
    g.add_argument("--hist_every", type=int, default=200, help="log logit histograms every N steps (0: never)")
    return p


def load_config(path, parser, loss=None):
    """Read a TOML config into parser defaults, checking every key is a known flag of the right type.

    Top-level keys apply to every run; a [bce], [infonce], [ce], ... table applies only with that
    loss (`loss`, chosen on the command line, else the file's `loss` / `use_infonce` key), so one
    file can hold tuned settings for each.
    """
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        parser.error(f"--config {path}: cannot read ({e.strerror})")
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--config {path}: not valid TOML ({e})")
    sections = {name: config.pop(name) for name in LOSSES if isinstance(config.get(name), dict)}
    loss = loss or config.get("loss") or ("infonce" if config.get("use_infonce") else "bce")
    config.update(sections.get(loss, {}))
    actions = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in config.items():
        key = KEY_ALIASES.get(key, key)
        action = actions.get(key)
        if action is None or key == "config":
            parser.error(f"--config {path}: unknown key {key!r} (keys are flag names, e.g. 'batch_size', "
                         f"or tables {list(LOSSES)})")
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                parser.error(f"--config {path}: key {key!r} expects {action.type.__name__}, got {value!r}")
        defaults[key] = value
    if isinstance(defaults.get("data"), str):
        defaults["data"] = resolve_data_path(defaults["data"])
    return defaults


def resolve_data_path(path):
    """Relative data paths in configs are tried from the working directory, then from the repository root."""
    if path == "synthetic" or os.path.isabs(path) or os.path.exists(path):
        return path
    from_root = os.path.join(ROOT, path)
    return from_root if os.path.exists(from_root) else path


def saved_config(state_dict_path, parser):
    """The resolved config saved beside a checkpoint, minus what names the current invocation."""
    path = os.path.join(os.path.dirname(checkpoint_file(state_dict_path, True)), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        saved = json.load(open(path))
    except (OSError, ValueError) as e:
        parser.error(f"--state_dict_path: unreadable {path} ({e})")
    if not isinstance(saved, dict):
        parser.error(f"--state_dict_path: {path} is not a saved config (expected a JSON object)")
    flags = {a.dest for a in parser._actions} - {"config", "state_dict_path", "inference_only", "help"}
    saved = {KEY_ALIASES.get(k, k): v for k, v in saved.items()}
    ckpt_dir = os.path.dirname(os.path.abspath(path))
    if saved.get("ckpt_dir") and os.path.abspath(saved["ckpt_dir"]) != ckpt_dir:  # the run was moved or copied:
        run_dir = os.path.dirname(ckpt_dir)                                        # write beside it, not where it was
        saved.update(ckpt_dir=ckpt_dir, run_dir=run_dir, log_dir=os.path.join(run_dir, "logs"),
                     tb_dir=os.path.join(run_dir, "tb"))
    return {k: v for k, v in saved.items() if k in flags}


def given(argv, *flags):
    """Whether any of `flags` appears on the command line (as --flag or --flag=value)."""
    return any(a.split("=")[0] in flags for a in argv)


def command_line_loss(known, argv):
    if given(argv, "--loss"):
        return known.loss
    if given(argv, "--use_infonce", "--no-use_infonce"):
        return "infonce" if known.use_infonce else "bce"
    return None


def resolve_loss(args, parser, argv):
    """--loss wins; --use_infonce is its shortcut; the two contradicting on the command line is an error."""
    if given(argv, "--loss") and given(argv, "--use_infonce") and args.use_infonce and args.loss != "infonce":
        parser.error(f"--use_infonce contradicts --loss {args.loss} (--use_infonce means --loss infonce)")
    args.loss = command_line_loss(args, argv) or args.loss or ("infonce" if args.use_infonce else "bce")
    args.use_infonce = args.loss == "infonce"
    args.similarity = args.similarity or ("cosine" if args.loss == "infonce" else "dot")


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    saved = saved_config(known.state_dict_path, parser) if known.state_dict_path else {}
    argv = sys.argv[1:] if argv is None else argv
    if known.config:
        parser.set_defaults(**load_config(known.config, parser, command_line_loss(known, argv)))
    parser.set_defaults(**saved)  # a checkpoint's own config beats a config file; the command line beats both
    args = parser.parse_args(argv)
    resolve_loss(args, parser, argv)
    for key in STRUCTURE_KEYS:
        if key in saved and getattr(args, key) != saved[key]:
            parser.error(f"--{key} {getattr(args, key)} contradicts the checkpoint's saved config "
                         f"({key} = {saved[key]})")
    for flag in ("maxlen", "hidden_units", "num_blocks", "num_heads", "batch_size", "num_epochs", "eval_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.hidden_units % args.num_heads:
        parser.error(f"--hidden_units ({args.hidden_units}) must be divisible by --num_heads ({args.num_heads})")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.learn_temperature and args.similarity != "cosine":
        parser.error("--learn_temperature needs cosine logits (--similarity cosine, the default for infonce)")
    if args.learn_temperature and not TEMPERATURE_RANGE[0] <= args.temperature <= TEMPERATURE_RANGE[1]:
        parser.error(f"--temperature {args.temperature}: a learnt temperature starts inside {list(TEMPERATURE_RANGE)}")
    if args.num_negatives < 1 or args.hard_negatives < 0:
        parser.error(f"--num_negatives must be >= 1 and --hard_negatives >= 0, got {args.num_negatives} and "
                     f"{args.hard_negatives}")
    if not 0 <= args.gbce_t <= 1:
        parser.error(f"--gbce_t must be in [0, 1], got {args.gbce_t}")
    if not 0 <= args.dropout_rate < 1:
        parser.error(f"--dropout_rate must be in [0, 1), got {args.dropout_rate}")
    for flag in ("item_features", "item_emb"):  # a config file may give one path or a list
        paths = getattr(args, flag) or []
        setattr(args, flag, [os.path.abspath(resolve_data_path(p)) for p in ([paths] if isinstance(paths, str) else paths)])
    if args.no_item_id and not (args.item_features or args.item_emb):
        parser.error("--no_item_id needs --item_features or --item_emb (items would have no representation)")
    if args.output_emb == "separate" and (args.item_features or args.item_emb):
        parser.error("--output_emb separate is for id embeddings only: with --item_features / --item_emb the "
                     "item tower scores the outputs")
    if args.inference_only and not args.state_dict_path:
        parser.error("--inference_only needs --state_dict_path")
    return args


# ----------------------------------------------------------------------------- files

def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def save_checkpoint(path, model, objective, optimizer, state):
    if not distributed.is_main():  # under torchrun every rank holds the same weights; rank 0 writes them
        return
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "objective": objective.state_dict(),
                                               "optimizer": optimizer.state_dict(), **state}, tmp))


def load_checkpoint(path):
    """weights_only=True: a checkpoint is data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--state_dict_path {path}: no such checkpoint")
    except Exception as e:  # truncated, not a checkpoint, or unsafe content (pickled code is refused, never run)
        fail(f"--state_dict_path {path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})")


def checkpoint_file(path, inference_only):
    if os.path.isdir(path):
        return os.path.join(path, "best.pt" if inference_only else "last.pt")
    return path


def output_dirs(args):
    if not args.run_dir:
        name = "synthetic" if args.data == "synthetic" else os.path.splitext(os.path.basename(args.data))[0]
        args.run_dir = os.path.join("runs", f"{name}_{args.loss}_{time.strftime('%Y%m%d-%H%M%S')}")
    args.log_dir = args.log_dir or os.path.join(args.run_dir, "logs")
    args.tb_dir = args.tb_dir or os.path.join(args.run_dir, "tb")
    args.ckpt_dir = args.ckpt_dir or os.path.join(args.run_dir, "ckpt")
    for flag in ("run_dir", "log_dir", "tb_dir", "ckpt_dir"):
        make_writable_folder(getattr(args, flag), f"--{flag}")


def check_not_overwriting(args):
    """A new run never replaces another run's checkpoints; resuming writes on into its own folder."""
    last = os.path.join(args.ckpt_dir, "last.pt")
    resumed_from = args.state_dict_path and os.path.dirname(os.path.abspath(checkpoint_file(args.state_dict_path, False)))
    if os.path.exists(last) and resumed_from != os.path.abspath(args.ckpt_dir):
        fail(f"--ckpt_dir {args.ckpt_dir} already holds a run ({last}); resume it with --state_dict_path "
             f"{args.ckpt_dir}, or choose another --run_dir / --ckpt_dir")


# ----------------------------------------------------------------------------- training

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine")
    return device


def keep_freed_memory():
    """Tell glibc's malloc to keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    Its default hands blocks over ~128 KB back to the OS and the next step faults them in again, zeroed:
    a step's activations are such blocks (6 CPU epochs on Beauty: 176k-478k page faults, 91k with this;
    README, Training speed). What PyTorch's CPU tuning guide gets from preloading jemalloc / tcmalloc.
    Returns whether it applied (not on macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))


def seed_epoch(seed, epoch, rank=0):
    """Every epoch draws from its own seeded streams, so a resumed run repeats the uninterrupted one exactly.
    Under torchrun the numpy stream (which users, in which order) is shared; torch's (dropout) is per rank."""
    torch.manual_seed(seed * 1_000_003 + epoch + rank * 1_000_000_007)
    return np.random.default_rng([seed, epoch])


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM only raise a flag: the loop ends its step, saves a resumable checkpoint, exits.

    A second signal acts as usual and aborts at once (checkpoints are written atomically either way).
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def rng_state():
    """This process's torch random state; under torchrun a list of every rank's (a collective call)."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return distributed.gather_objects(mine) if distributed.world_size() > 1 else mine


def set_rng_state(saved):
    if isinstance(saved, list):  # one per rank (torchrun); train_epoch has checked the process count
        saved = saved[distributed.rank()]
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


class TrainStep(nn.Module):
    """Model + objective as one module whose forward returns the loss: what DDP wraps (DDP synchronises
    the gradients of what its wrapped forward computed). `compiled`: torch.compile it, eager if that fails."""

    def __init__(self, model, objective, compiled=False):
        super().__init__()
        self.model, self.objective = model, objective
        self.compiled = torch.compile(self.loss) if compiled else None
        self.compile_checked = False

    def loss(self, seq, pos, neg, with_logits=False):
        return self.objective(self.model, seq, pos, neg, with_logits=with_logits)

    def forward(self, seq, pos, neg, with_logits=False):
        if self.compiled is None:
            return self.loss(seq, pos, neg, with_logits)
        if self.compile_checked:
            return self.compiled(seq, pos, neg, with_logits)
        try:  # compilation happens on the first call: only its failure falls back (no toolchain, unsupported op)
            out = self.compiled(seq, pos, neg, with_logits)
            self.compile_checked = True
            return out
        except Exception as e:
            print(f"warning: --compile failed ({type(e).__name__}: {first_line(e)}); continuing without it")
            self.compiled = None
            return self.loss(seq, pos, neg, with_logits)


def make_step(model, objective, args, device):
    """The training step module: TrainStep, DDP-wrapped under torchrun."""
    step = TrainStep(model, objective, compiled=args.compile and device.type == "cuda")
    if distributed.world_size() == 1:
        return step
    # The buffers (item side codes, sampler tables) are constants: nothing to broadcast every step.
    return DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def to_device(array, device):
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # page-locked host memory: the copy runs asynchronously
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def train_epoch(step, optimizer, batches, args, device, state, writer, stop):
    """Epoch state['epoch'] + 1, from batch state['batch'] on (0, or where an interrupted run stopped).

    Advances state['step'] and state['batch']; returns early, mid-epoch, once `stop` has a signal (on
    any rank: every rank then stops after the same step). Under torchrun each rank's loss is weighted by
    its share of the step's rows, so the averaged gradient is that of one process on all ranks' batches.
    """
    epoch = state["epoch"] + 1
    world = distributed.world_size()
    if state["batch"] and state.get("world", 1) != world:
        fail(f"--state_dict_path: the checkpoint was interrupted mid-epoch with {state.get('world', 1)} "
             f"process(es); resume it with the same number ({world} now)")
    step.train()
    objective = getattr(step, "module", step).objective
    batch_iter = batches.epoch(seed_epoch(args.seed, epoch, distributed.rank()))
    if state["batch"]:  # replay the interrupted part's draws, so the rest of the epoch matches exactly
        for _ in range(state["batch"]):
            next(batch_iter)
        set_rng_state(state["rng"])
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and args.amp == "bf16")
    total_loss, total_rows, seen, start = 0.0, 0.0, 0, time.perf_counter()
    bar = tqdm(batch_iter, total=len(batches), initial=state["batch"], desc=f"epoch {epoch}", leave=False,
               disable=not sys.stderr.isatty() or not distributed.is_main())
    for batch in bar:
        seq, pos, neg = (to_device(batch[k], device) for k in ("seq", "pos", "neg"))
        log_now = (state["step"] + 1) % LOG_EVERY == 0
        with autocast:
            loss, logits = step(seq, pos, neg, with_logits=log_now)
        rows = (pos != 0).sum()
        # One small all-reduce per step: all ranks' rows, summed loss (a NaN anywhere stops every rank), signals.
        totals = distributed.sum_all(torch.stack([rows.double(), loss.detach().double() * rows,
                                                  torch.tensor(float(bool(stop.received)), device=device)]))
        step_rows, step_loss, signals = totals.tolist()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"non-finite loss ({step_loss / step_rows}) at epoch {epoch}, "
                                     f"step {state['step'] + 1}")
        optimizer.zero_grad(set_to_none=True)
        (loss if world == 1 else loss * (rows * world / step_rows)).backward()
        set_lr(optimizer, args, state["step"] / (args.num_epochs * len(batches)))
        optimizer.step()
        state["step"] += 1
        state["batch"] += 1
        seen += len(batch["users"]) * world
        total_loss += step_loss
        total_rows += step_rows
        if log_now:
            log_logits(writer, state["step"], step_loss / step_rows, *logits, args.hist_every)
            if args.similarity == "cosine":
                writer.add_scalar("train/temperature", objective.temperature().item(), state["step"])
            bar.set_postfix(loss=f"{step_loss / step_rows:.4f}", seq_s=f"{seen / (time.perf_counter() - start):.0f}")
        if signals:
            stop.received = stop.received or "signal on another rank"
            break
    seconds = time.perf_counter() - start
    return total_loss / max(total_rows, 1), seen / seconds, seconds


def set_lr(optimizer, args, progress):
    """The learning rate at `progress` (0 -> 1) through the planned training."""
    lr = args.lr if args.lr_schedule == "constant" else args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def log_logits(writer, step, loss, pos_logits, neg_logits, hist_every):
    writer.add_scalar("train/loss", loss, step)
    for name, x in (("pos", pos_logits), ("neg", neg_logits)):
        x = x.float()
        writer.add_scalar(f"logits/{name}_mean", x.mean().item(), step)
        writer.add_scalar(f"logits/{name}_std", x.std().item() if x.numel() > 1 else 0.0, step)
        if hist_every and step % hist_every == 0:
            writer.add_histogram(f"logits/{name}", x.cpu(), step)


def run_evaluation(model, split, args, device, which, sharded=False):
    """Metrics of `model` on `which`; `sharded`: split over the torchrun ranks, rank 0 gets them (others None)."""
    model.eval()
    # Rank as the loss trained the model to score: cosine or dot product.
    score = model_scorer(model, split.data, args.maxlen, device, cosine=args.similarity == "cosine")
    return evaluate(score, split, which, exclude_history=not args.keep_history, sampled=args.sampled_metrics,
                    seed=args.seed, rare_below=args.rare_below, sharded=sharded)


def describe_loss(args):
    """One line naming the loss and the settings that matter for it."""
    parts = [args.loss]
    if args.similarity == "cosine":
        parts.append(f"cosine / T={args.temperature:g}{' (learnt)' if args.learn_temperature else ''}")
    if args.loss in ("gbce", "sampled_softmax"):
        parts.append(f"{args.num_negatives} negatives")
    if args.loss == "gbce":
        parts.append(f"t={args.gbce_t:g}")
    if args.loss == "sampled_softmax":
        parts.append(f"{args.neg_sampler}{' + in-batch' if args.in_batch_negatives else ''}"
                     f"{', logQ' if args.logq_correction else ''}")
    if args.hard_negatives and args.loss in SOFTMAX_LOSSES:
        parts.append(f"{args.hard_negatives} hardest negatives")
    return ", ".join(parts)


def format_metrics(m, keys=("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")):
    return " ".join(f"{k} {m[k]:.4f}" for k in keys)


def final_report(model, split, args, device, summary):
    """Test (and validation) metrics of the model next to the popularity baseline, printed and saved as JSON."""
    results = {"config": vars(args), **summary}
    for which in ("valid", "test"):
        results[which] = run_evaluation(model, split, args, device, which)
        pop = popularity_scorer(split.item_counts(which))
        results[f"popularity_{which}"] = evaluate(pop, split, which, exclude_history=not args.keep_history,
                                                  sampled=args.sampled_metrics, seed=args.seed,
                                                  rare_below=args.rare_below)
    keys = ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"]
    if args.sampled_metrics:
        keys += ["sampled_HR@10", "sampled_NDCG@10"]
    if "rare_HR@10" in results["test"]:
        keys += ["rare_HR@10", "rare_NDCG@10"]
    print(f"\ntest metrics ({results['test']['users']} users, full ranking"
          f"{', history kept' if args.keep_history else ', history excluded'}):")
    print(f"  {'metric':<16}{'SASRec':>10}{'popularity':>12}")
    for k in keys:
        print(f"  {k:<16}{results['test'][k]:>10.4f}{results['popularity_test'][k]:>12.4f}")
    if args.rare_below:
        print(f"  rare_*: the {results['test']['rare_users']} users whose test item was seen < {args.rare_below} "
              f"times before")
    path = os.path.join(args.run_dir, "eval_results.json" if args.inference_only else "results.json")
    write_json(path, results)
    print(f"results written to {path}")
    return results


def load_data(args):
    # Under torchrun rank 0 parses and caches the log first; the others then map its cache.
    cache_first = bool(args.cache_dir) and args.data != "synthetic" and distributed.world_size() > 1
    if cache_first and not distributed.is_main():
        distributed.barrier()
    try:
        data = load_interactions(args.data, args.data_format, args.cache_dir or None,
                                 args.user_col, args.item_col, args.time_col, args.id_type)
    except DataError as e:
        fail(str(e))
    if cache_first and distributed.is_main():
        distributed.barrier()
    single = np.flatnonzero(data.lengths == 1)
    if len(single) and args.single_item_users == "error":
        fail(f"{args.data}: {len(single)} user(s) with a single interaction, e.g. user {str(data.user_ids[single[0]])!r}: "
             f"nothing to train or evaluate on (expected >= 2 per user; --single_item_users ignore skips them)")
    split = LeaveOneOut(data)
    if len(split.eval_users) == 0:
        fail(f"{args.data}: no user has the 3 or more interactions that leave-one-out needs "
             f"(one to train on, one to validate, one to test)")
    print(f"data {args.data}: {data.num_users} users, {data.num_items} items, {len(data.items)} interactions; "
          f"{len(split.eval_users)} users evaluated"
          + (f", {split.num_short_users} users with < 3 items used for training only" if split.num_short_users else ""))
    return data, split


def restore(path, model, objective, optimizer, state, inference_only):
    """Load a checkpoint's weights (and objective, optimizer + loop state when resuming) in place."""
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"])
        if not inference_only:
            objective.load_state_dict(ckpt.get("objective", {}))
            optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        fail(f"--state_dict_path {path}: does not fit this model ({type(e).__name__}: {first_line(e)})")
    state.update({k: ckpt[k] for k in state if k in ckpt})
    print(f"loaded {path} (epoch {state['epoch']}, step {state['step']})")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


class NullWriter:
    """SummaryWriter's stand-in on ranks other than 0 (and in benchmarks): logs nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    add_histogram = add_scalar


def train(model, objective, optimizer, split, args, device, state):
    """Epochs with validation every --eval_every, best/last checkpoints, early stopping on NDCG@10.

    Under torchrun every rank trains and validates a share; rank 0 alone writes logs, TensorBoard and checkpoints.
    """
    main_rank = distributed.is_main()
    batches = TrainBatches(split, args.maxlen, args.batch_size, rank=distributed.rank(),
                           world=distributed.world_size())
    if len(batches) == 0:  # every rank computes the same: all stop here
        fail(f"{args.data}: {len(batches.users)} trainable users make fewer batches of --batch_size "
             f"{args.batch_size} than the {distributed.world_size()} processes (each needs one a step)")
    step = make_step(model, objective, args, device)
    last_path = os.path.join(args.ckpt_dir, "last.pt")
    if main_rank:
        remove_stale_temp_files(args.ckpt_dir)
    log_path = os.path.join(args.log_dir, "train.log") if main_rank else os.devnull
    with SummaryWriter(args.tb_dir) if main_rank else NullWriter() as writer, open(log_path, "a") as log, \
            GracefulStop() as stop:
        while state["epoch"] < args.num_epochs:
            epoch = state["epoch"] + 1
            try:
                loss, seq_per_s, seconds = train_epoch(step, optimizer, batches, args, device, state, writer, stop)
            except FloatingPointError as e:  # nothing is saved: the checkpoints on disk predate the failure
                fail(f"{e}; training stopped, checkpoints left as they were ({last_path})", code=1)
            if stop.received and state["batch"] < len(batches):
                state["rng"], state["world"] = rng_state(), distributed.world_size()
                save_checkpoint(last_path, model, objective, optimizer, state)
                interrupted(stop, state, epoch, len(batches), args)
            state.update(epoch=epoch, batch=0, rng=None)
            for name, value in (("epoch_loss", loss), ("lr", optimizer.param_groups[0]["lr"]),
                                ("sequences_per_s", seq_per_s)):
                writer.add_scalar(f"train/{name}", value, epoch)
            record = {"epoch": epoch, "step": state["step"], "loss": loss, "seq_per_s": seq_per_s,
                      "seconds": seconds, "peak_rss_mb": round(peak_rss_mb(), 1)}
            line = f"epoch {epoch:4d}  loss {loss:.4f}  {seq_per_s:7.0f} seq/s  {seconds:5.1f}s"
            stop_early = False
            if epoch % args.eval_every == 0 or epoch == args.num_epochs:
                record["valid"], stop_early = validate(model, objective, optimizer, split, args, device, state,
                                                       writer)
                if main_rank:
                    line += f"  valid {format_metrics(record['valid'])}{'  *' if state['best_epoch'] == epoch else ''}"
            save_checkpoint(last_path, model, objective, optimizer, state)
            print(line, flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if distributed.any_rank(stop.received, device):  # decided together: no rank left in a collective
                stop.received = stop.received or "signal on another rank"
                interrupted(stop, state, epoch + 1, len(batches), args)
            if stop_early:
                print(f"early stop: no better validation NDCG@10 for {args.patience} evaluations")
                break


def validate(model, objective, optimizer, split, args, device, state, writer):
    """Validation metrics; saves best.pt on a new best NDCG@10. Returns (metrics, whether to stop early).
    Under torchrun the ranks score shares of the users; rank 0 decides and tells the others whether to stop."""
    valid = run_evaluation(model, split, args, device, "valid", sharded=True)
    if not distributed.is_main():
        return {}, distributed.broadcast(None)
    epoch, stop = state["epoch"], False
    for k, v in valid.items():
        writer.add_scalar(f"valid/{k}", v, epoch)
    if valid["NDCG@10"] > state["best_ndcg"]:
        state.update(best_epoch=epoch, best_ndcg=valid["NDCG@10"], bad_evals=0)
        save_checkpoint(os.path.join(args.ckpt_dir, "best.pt"), model, objective, optimizer, state)
    else:
        state["bad_evals"] += 1
        stop = state["bad_evals"] >= args.patience
    return valid, distributed.broadcast(stop)


def interrupted(stop, state, epoch, num_batches, args):
    print(f"{stop.received}: stopped at epoch {epoch}, batch {state['batch']}/{num_batches} (step {state['step']}); "
          f"checkpoint saved. Resume with: {launcher()} main.py --state_dict_path {args.ckpt_dir}", flush=True)
    sys.exit(130)


def launcher():
    """How this run was started, for the resume hint."""
    world = distributed.world_size()
    return f"torchrun --nproc_per_node={world}" if world > 1 else "python"


def fresh_state():
    """Loop state saved in every checkpoint. epoch: epochs finished; batch: batches done in the next one (> 0
    after an interrupt); rng: the random state at that batch; world: the process count that state is for."""
    return {"epoch": 0, "step": 0, "batch": 0, "rng": None, "world": 1, "best_epoch": 0, "best_ndcg": -1.0,
            "bad_evals": 0}


def build(args, data, split, device):
    """Model, training objective and optimizer for `args` on `data`."""
    args.num_items = data.num_items
    try:
        side = load_side_info(data.item_ids, args.item_features, args.item_emb, args.feature_sep)
    except DataError as e:
        fail(str(e))
    args.item_side = side.spec()  # saved in config.json: eval/infer.py rebuilds the model from it
    model = SASRec(data.num_items, args.maxlen, args.hidden_units, args.num_blocks, args.num_heads,
                   args.dropout_rate, args.norm_first, args.item_side, not args.no_item_id,
                   args.output_emb == "separate")
    if model.item_side is not None:
        model.item_side.load_arrays(side)
    model = model.to(device)
    objective = Objective(args, split.item_counts("valid")).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=args.lr, betas=(0.9, 0.98),
                                 fused=device.type in ("cpu", "cuda"))
    return model, objective, optimizer


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    if args.data != "synthetic":
        args.data = os.path.abspath(args.data)  # the saved config must work from any directory
    device = distributed.init(resolve_device(args.device))
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 reports; errors still reach stderr
    try:
        run_job(args, device)
        # Every rank leaves the process group together, after rank 0's report: a rank tearing gloo down
        # while rank 0 still worked aborted now and then ("terminate called without an active exception").
        distributed.barrier()
    finally:
        distributed.shutdown()


def on_rank0(check):
    """Run `check` on rank 0 only; if it stops with an error (cli.fail), every rank exits with that status
    rather than waiting in the next collective for a rank that is gone."""
    status = None
    if distributed.is_main():
        try:
            check()
        except SystemExit as e:
            status = e.code
    status = distributed.broadcast(status)
    if status is not None:
        sys.exit(status)


def run_job(args, device):
    if device.type != "cuda" and (args.amp != "none" or args.compile):
        print(f"note: --amp {args.amp} / --compile act on CUDA only; on {device} they do nothing")
    if args.gather_negatives and (distributed.world_size() == 1 or args.loss not in ("infonce", "sampled_softmax")):
        print("note: --gather_negatives acts on infonce / sampled_softmax under torchrun with 2+ processes; "
              "here it does nothing")
    torch.manual_seed(args.seed)
    data, split = load_data(args)
    model, objective, optimizer = build(args, data, split, device)
    state = fresh_state()
    if args.state_dict_path:
        path = checkpoint_file(args.state_dict_path, args.inference_only)
        restore(path, model, objective, optimizer, state, args.inference_only)
    main_rank = distributed.is_main()
    def prepare_outputs():
        output_dirs(args)
        if not args.inference_only:
            check_not_overwriting(args)
    on_rank0(prepare_outputs)
    dirs = distributed.broadcast({k: getattr(args, k) for k in ("run_dir", "log_dir", "tb_dir", "ckpt_dir")})
    vars(args).update(dirs)
    if args.inference_only:
        if main_rank:
            final_report(model, split, args, device, {"checkpoint": path})
        return
    if main_rank:
        write_json(os.path.join(args.ckpt_dir, "config.json"), vars(args))
        write_json(os.path.join(args.ckpt_dir, "id_map.json"),
                   {"items": data.item_ids.tolist(), "users": data.user_ids.tolist()})
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    print(f"training {sum(p.numel() for p in model.parameters())} parameters on {device}{processes}, "
          f"loss {describe_loss(args)}, run dir {args.run_dir}")
    start = time.perf_counter()
    train(model, objective, optimizer, split, args, device, state)
    train_minutes = (time.perf_counter() - start) / 60
    if main_rank:
        best_path = os.path.join(args.ckpt_dir, "best.pt")
        if os.path.exists(best_path):
            model.load_state_dict(load_checkpoint(best_path)["model"])
        print(f"best validation NDCG@10 {state['best_ndcg']:.4f} at epoch {state['best_epoch']}; "
              f"training took {train_minutes:.1f} min")
        final_report(model, split, args, device, {"best_epoch": state["best_epoch"],
                                                  "train_minutes": train_minutes, "checkpoint": best_path})


if __name__ == "__main__":
    run(main)
