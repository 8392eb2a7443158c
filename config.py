"""Typed configuration, built once: config file -> defaults -> command-line flags -> a frozen `Config`.

Each field below is a flag of main.py (same name); its default and help live here and nowhere else.
`build_config(argv)` parses, merges and validates in one place and raises UsageError with one line.
The resolved config is saved as ckpt/config.json (flat: flag name -> value), so resuming and inference
never repeat training flags; the model's part is also saved inside every checkpoint.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from typing import Optional, get_args

from cli import ArgumentParser, UsageError

ROOT = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("lines", "pairs", "delimited")  # log layouts readers/logs.py reads
ID_TYPES = ("auto", "int", "str")
LOSSES = ("bce", "gbce", "infonce", "sampled_softmax", "ce")
TEMPERATURE_RANGE = (0.01, 1.0)  # a learnable temperature is clamped here (CLIP's bound on 1/T is 100)
BIAS_KINDS = ("position", "time")  # --attn_bias: relative attention biases (encoders/bias.py)
KEY_ALIASES = {"infonce_temperature": "temperature"}  # old config keys still accepted
# Fields that fix the network's shape: a checkpoint loads only into a model built with the same values.
STRUCTURE_KEYS = ("maxlen", "hidden_units", "num_blocks", "num_heads", "norm_first", "emb_scale", "output_emb",
                  "user_features", "action_emb", "time_features", "encoder", "attn_bias", "next_action")


def flag(default, help, **argparse_options):
    """A config field that is also a command-line flag (argparse options ride in the field's metadata)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass(frozen=True)
class DataConfig:
    data: str = flag("synthetic", "interaction log path, or 'synthetic' for the embedded default")
    data_format: Optional[str] = flag(None, "lines: 'user i1 i2 ...'; pairs: 'user item' per line; delimited: "
                                      "CSV/TSV/RecBole .inter with a header; taac: a competition folder (jsonl or "
                                      "parquet layout) (default: detect)", choices=FORMATS + ("taac",))
    user_col: Optional[str] = flag(None, "delimited format: user column name (default: detect)")
    item_col: Optional[str] = flag(None, "delimited format: item column name (default: detect)")
    time_col: Optional[str] = flag(None, "delimited format: timestamp column name (default: detect, optional)")
    action_col: Optional[str] = flag(None, "delimited format: a column of action types (integers 0..127: 0 exposure, "
                                     "1 click, 2 conversion as in competition logs), or a numeric column split at "
                                     "--action_threshold")
    action_threshold: Optional[float] = flag(None, "--action_col: values >= this are clicks (action 1), the rest "
                                             "exposures (action 0), e.g. 4 for ratings 4-5", type=float)
    id_type: str = flag("auto", "raw ids: int, str, or auto (a column of mostly integers is an integer column, "
                        "and a non-integer in it is an error)", choices=ID_TYPES)
    single_item_users: str = flag("error", "users with one interaction give nothing to train or evaluate on: "
                                  "stop with an error, or ignore them", choices=("error", "ignore"))
    cache_dir: str = flag(None, "parsed logs are cached here, keyed by the file's content hash ('' disables)",
                          env="SASREC_CACHE_DIR", fallback=os.path.join(ROOT, ".cache"))
    verify_cache: bool = flag(False, "check every cached array's SHA-256 on load (a damaged cache is rebuilt); sizes "
                              "and shapes are always checked")
    item_features: tuple = flag((), "item attributes: JSON {item: [values]} or a delimited file with an item "
                                "column and one column per feature (repeatable)", action="append", metavar="FILE")
    feature_sep: str = flag("|", "separator of multi-valued cells in --item_features")
    item_emb: tuple = flag((), "frozen pretrained item vectors: .npz (ids, vectors) or .npy with <name>.ids.txt "
                           "(repeatable)", action="append", metavar="FILE")
    # Competition folders (--data DIR, readers/taac.py):
    mm_emb_id: tuple = flag((), "competition folders: multimodal feature ids to load, e.g. 81 82 (as the "
                            "basemodel's flag)", nargs="+", metavar="ID")
    semantic_ids: tuple = flag((), "L K: semantic ids of the items, L levels of K residual k-means centroids "
                               "(RQ-KMeans) over their vectors (--mm_emb_id, --item_emb), as L more item features "
                               "(items without a vector: none); computed once, cached", nargs=2, type=int,
                               metavar=("L", "K"))
    item_feature_ids: Optional[tuple] = flag(None, "competition folders: item feature ids to use (default: all "
                                             "in the data; the flag alone: none)", nargs="*", metavar="ID")
    user_feature_ids: Optional[tuple] = flag(None, "competition folders: user feature ids to use (default: all "
                                             "in the data; the flag alone: none)", nargs="*", metavar="ID")
    non_finite: str = flag("error", "competition folders: a NaN / infinite (in float16) vector or value is an error, "
                           "or zero: treated as absent (counted in a warning)", choices=("error", "zero"))

    @property
    def competition_folder(self) -> bool:
        """--data is a competition folder (asked for, or a directory): read by readers/taac.py."""
        return self.data_format == "taac" or os.path.isdir(self.data)


@dataclass(frozen=True)
class ModelConfig:
    maxlen: int = flag(50, "longest input sequence (most recent items kept)")
    hidden_units: int = flag(50, "width of embeddings and blocks")
    num_blocks: int = flag(2, "transformer blocks")
    num_heads: int = flag(1, "attention heads (divides --hidden_units)")
    dropout_rate: float = flag(0.2, "dropout on embeddings, block outputs and the feed-forward")
    item_emb_dropout: float = flag(0.0, "dropout on the item id table in training, one mask per step shared by "
                                   "inputs and targets (RecTools 0.13, eSASRec's SASRec+SS row)")
    item_id_dropout: float = flag(0.0, "training: each step removes the whole id embedding of this fraction of "
                                  "the items (one draw per step, unscaled), as a creative training never saw has "
                                  "none at competition inference; needs item features or vectors")
    norm_first: bool = flag(True, "pre-norm blocks (--no-norm_first: post-norm)")
    emb_scale: bool = flag(True, "input item vectors x sqrt(hidden_units), as SASRec (--no-emb_scale: unscaled, as "
                           "RecTools)")
    output_emb: str = flag("tied", "item table the states are scored against: the input table (tied, as in "
                           "SASRec) or one of its own", choices=("tied", "separate"))
    no_item_id: bool = flag(False, "items from side information only (cold-start tower)", action="store_true")
    user_features: str = flag("token", "logs with user features: a first token every position attends to (as "
                              "the basemodel), added to every state, or unused", choices=("token", "add", "none"))
    action_emb: bool = flag(True, "logs with action types: each input event's action embedded into its token")
    next_action: bool = flag(False, "logs with action types: each position is also told the action type of the "
                             "event it predicts (never its item); evaluation and inference ask for "
                             "--predict_action")
    time_features: bool = flag(False, "logs with timestamps: log-bucketed gaps to the previous event and to the "
                               "prediction time, hour and weekday, embedded into each token")
    encoder: str = flag("sasrec", "sasrec: softmax attention + feed-forward blocks; hstu: HSTU layers (pointwise "
                        "SiLU attention gated by U, no feed-forward; Zhai et al. 2024)", choices=("sasrec", "hstu"))
    attn_bias: str = flag("", "relative attention bias in every layer, comma-separated: position (a weight per "
                          "relative offset), time (per log-bucketed gap from the query's prediction time to the "
                          "key's time; logs with timestamps), e.g. position,time")
    # From the data, not flags: catalogue size, side-information shapes (features.SideInfo.spec), action types.
    num_items: int = 0
    item_side: Optional[dict] = None
    user_side: Optional[dict] = None
    num_actions: int = 0


@dataclass(frozen=True)
class LossConfig:
    loss: Optional[str] = flag(None, "default: bce, or infonce with --use_infonce", choices=LOSSES)
    similarity: Optional[str] = flag(None, "logits (and ranking): dot product, or cosine / temperature (default: "
                                     "cosine for infonce, dot otherwise)", choices=("dot", "cosine"))
    temperature: float = flag(0.1, "divides cosine logits", aliases=("--infonce_temperature",))
    learn_temperature: bool = flag(False, f"learn the temperature (log-parameterised, clamped to "
                                   f"{list(TEMPERATURE_RANGE)}), starting from --temperature")
    num_negatives: int = flag(256, "negatives per batch (sampled_softmax) or per sequence (gbce)")
    neg_sampler: str = flag("uniform", "sampled_softmax: how negatives are drawn (gbce is always uniform)",
                            choices=("uniform", "popularity"))
    popularity_alpha: float = flag(1.0, "--neg_sampler popularity: draw an item with probability proportional to "
                                   "(its training count + 1) ^ alpha (0.75: word2vec's; 0: uniform)")
    logq_correction: bool = flag(True, "sampled_softmax: subtract log(expected count in the pool) from every logit")
    in_batch_negatives: bool = flag(False, "sampled_softmax: the batch's positives join the pool (accidental "
                                    "hits masked)")
    gbce_t: float = flag(0.75, "gbce: calibration t in [0, 1] (0 = plain BCE)")
    hard_negatives: int = flag(0, "softmax losses: keep each row's K highest-scoring negatives (0: all)")
    hard_negatives_to: Optional[int] = flag(None, "softmax losses: a curriculum, K moving linearly from "
                                            "--hard_negatives to this over --hard_negatives_steps optimizer steps, "
                                            "then staying there (e.g. 512 to 64)", type=int)
    hard_negatives_steps: int = flag(0, "--hard_negatives_to: the optimizer steps the curriculum lasts")
    negatives_per_position: bool = flag(False, "sampled_softmax: --num_negatives uniform negatives drawn for "
                                        "every real position (as RecTools / eSASRec) instead of one pool shared "
                                        "by the batch", action="store_true")
    symmetric: bool = flag(False, "infonce: add the item-to-sequence direction (each positive item against the "
                           "batch's states) and take the mean of both", action="store_true")
    negative_queue: int = flag(0, "infonce / sampled_softmax: a FIFO of the last N negatives of earlier steps "
                               "(vectors detached, ids kept for hit masking) joins each step's pool (0: none)")
    loss_schedule: Optional[str] = flag(None, "multi-stage training, LOSS:EPOCHS stages then a last LOSS, e.g. "
                                        "'bce:5,infonce' (the last stage's loss is --loss; all share --similarity)")
    augment: float = flag(0.0, "weight of a CL4SRec auxiliary loss: InfoNCE between two augmented views of each "
                          "training sequence (0: off)")
    augmentations: tuple = flag(("crop", "mask", "reorder"), "--augment: each view applies one of these, drawn "
                                "at random", nargs="+", choices=("crop", "mask", "reorder"))
    align_side_info: float = flag(0.0, "weight of an InfoNCE between each batch item's id embedding and its "
                                  "side-information vector (attributes / multimodal; 0: off)")
    gather_negatives: bool = flag(False, "infonce / sampled_softmax under torchrun: the pool holds every rank's "
                                  "negatives (gradients flow back through the gather)")
    l2_emb: float = flag(0.0, "weight of the item-embedding norm penalty")
    positive_actions: Optional[tuple] = flag(None, "logs with action types: actions whose events are training "
                                             "targets, e.g. 1 2 (exposures stay inputs; default: all)", nargs="+",
                                             type=int, metavar="ACTION")
    action_weights: tuple = flag((), "loss weight of a target by its action, ACTION=WEIGHT, e.g. 2=2.5 (others "
                                 "1)", nargs="+", metavar="A=W")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = flag(128, "sequences per step (per process under torchrun)")
    bucket_batches: int = flag(32, "users sorted by history length within windows of N batches, so a batch is "
                               "as wide as its longest user (fewer padded positions); 1: random batches")
    loss_reduction: str = flag("batch", "batch: a step's loss is its batch's mean over positions (with bucketing a "
                               "batch of short histories weighs as much as one of long ones); position: the sum "
                               "over positions / the epoch's mean per batch (every position weighs the same)",
                               choices=("batch", "position"))
    lr: float = flag(0.001, "learning rate (of every optimizer: Muon's update is scaled to AdamW's RMS)")
    optimizer: str = flag("adam", "adam; adamw: decoupled --weight_decay; muon: Muon on the encoder layers' weight "
                          "matrices, AdamW on the rest", choices=("adam", "adamw", "muon"))
    weight_decay: float = flag(0.0, "decoupled weight decay of adamw / muon (0: none)")
    lr_schedule: str = flag("constant", "cosine: decay from --lr to 0 over --num_epochs; plateau: constant --lr "
                            "until --patience validations bring no better NDCG@10, then a cosine decay to 0 over "
                            "--decay_fraction x the epochs so far, then stop (a function of the step: resumable)",
                            choices=("constant", "cosine", "plateau"))
    min_delta: float = flag(0.0, "a validation resets --patience only when its NDCG@10 beats the last reset's by "
                            "this relative margin (0.01: 1%%); best.pt still follows every improvement")
    min_steps: int = flag(0, "plateau schedule: no final decay before this many optimizer steps (a small log has "
                          "few steps an epoch, and its first validations are noise)")
    decay_fraction: float = flag(0.5, "plateau schedule: length of the final decay, as a fraction of the epochs "
                                 "trained when it starts")
    ema_decay: float = flag(0.0, "keep an exponential moving average of the weights with this decay per step "
                            "(e.g. 0.999): validation, best.pt and inference use it (0: off)")
    num_epochs: int = flag(200, "epochs at most")
    device: str = flag("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    seed: int = flag(42, "seeds every random stream (per epoch, so a resumed run repeats the straight one)")
    eval_every: int = flag(5, "validate every N epochs")
    patience: int = flag(5, "stop after N validations without a better NDCG@10 (plateau schedule: start the "
                         "final decay)")
    state_dict_path: Optional[str] = flag(None, "checkpoint (.pt, or a checkpoint dir) to resume from or evaluate")
    inference_only: bool = flag(False, "evaluate --state_dict_path and exit", action="store_true")
    finetune: bool = flag(False, "with --state_dict_path: a new run (its own --run_dir, a fresh optimizer, epoch 0) "
                          "starting from the checkpoint's weights on --data, which may differ from the checkpoint's: "
                          "items are matched by raw id, new items start untrained", action="store_true")
    allow_other_data: bool = flag(False, "with --inference_only: evaluate on a log whose content differs from the "
                                  "checkpoint's (its item ids must be the same)", action="store_true")
    amp: str = flag("none", "bf16: the encoder under bfloat16 autocast and the softmax pool's matmuls in bf16 "
                    "(logits, losses, weights and optimizer in fp32); on CUDA, or a CPU with AMX / AVX512-BF16",
                    choices=("none", "bf16"))
    compile: bool = flag(False, "CUDA only. torch.compile the training step; eager if compilation fails")
    hist_every: int = flag(200, "log logit histograms every N steps (0: never)")


@dataclass(frozen=True)
class EvalConfig:
    keep_history: bool = flag(False, "let already-seen items compete in the ranking", action="store_true")
    rare_below: int = flag(0, "also report metrics on targets seen in training fewer than N times (rare_* keys)")
    sampled_metrics: bool = flag(False, "also report metrics against 100 random negatives (SASRec paper protocol)")
    eval_actions: Optional[tuple] = flag(None, "logs with action types: evaluate only users whose held-out "
                                         "target has one of these actions, e.g. 1 2 (default: all)", nargs="+",
                                         type=int, metavar="ACTION")
    predict_action: int = flag(1, "--next_action: the action type the last position is asked for at validation, "
                               "test and inference (1: a click)")
    score_weights: tuple = flag(("0=0", "1=1", "2=2.5"), "action weights of the action-weighted competition "
                                "score (weighted_score), ACTION=WEIGHT", nargs="+", metavar="A=W")


@dataclass(frozen=True)
class OutputConfig:
    run_dir: Optional[str] = flag(None, "default: runs/<data>_<loss>_<time>")
    log_dir: Optional[str] = flag(None, "default: <run_dir>/logs", env="TRAIN_LOG_PATH")
    tb_dir: Optional[str] = flag(None, "default: <run_dir>/tb", env="TRAIN_TF_EVENTS_PATH")
    ckpt_dir: Optional[str] = flag(None, "default: <run_dir>/ckpt", env="TRAIN_CKPT_PATH")


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    eval: EvalConfig
    output: OutputConfig

    def flat(self):
        """flag name -> value, as saved in config.json."""
        return {k: v for section in dataclasses.fields(self) for k, v in
                dataclasses.asdict(getattr(self, section.name)).items()}

    @property
    def cosine(self):
        return self.loss.similarity == "cosine"


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
INVOCATION_FLAGS = ("state_dict_path", "inference_only", "finetune", "allow_other_data")  # never inherited
OUTPUT_FLAGS = tuple(f.name for f in dataclasses.fields(OutputConfig))
FLAG_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.metadata}


def build_parser():
    p = ArgumentParser(description="Train / evaluate a SASRec sequential recommender.", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML file whose keys are these flags' names; command-line flags override it")
    p.add_argument("--use_infonce", action=argparse.BooleanOptionalAction, default=False,
                   help="shortcut for --loss infonce: masked in-batch InfoNCE on cosine logits")
    for name, cls in SECTIONS.items():
        group = p.add_argument_group(name)
        for f in dataclasses.fields(cls):
            if f.metadata:
                _add_flag(group, f)
    return p


def _add_flag(group, f):
    meta = dict(f.metadata)
    kwargs = {"help": meta.pop("help"), "dest": f.name}
    names = [f"--{f.name}", *meta.pop("aliases", ())]
    env, fallback = meta.pop("env", None), meta.pop("fallback", None)
    default = os.environ.get(env, fallback) if env else f.default
    if f.type is bool:
        meta.setdefault("action", argparse.BooleanOptionalAction)
    elif meta.get("action") != "append":
        kwargs["type"] = meta.pop("type", {int: int, float: float}.get(f.type, str))
    group.add_argument(*names, default=default if meta.get("action") != "append" else None, **kwargs, **meta)


# ----------------------------------------------------------------------------- merging

def load_config_file(path, parser, loss=None):
    """A TOML config as parser defaults, each key checked to be a known flag of the right type.

    Top-level keys apply to every run; a [bce], [infonce], ... table applies only with that loss (`loss`,
    chosen on the command line, else the file's `loss` / `use_infonce` key), so one file holds tuned
    settings for each."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    sections = {name: config.pop(name) for name in LOSSES if isinstance(config.get(name), dict)}
    loss = loss or config.get("loss") or ("infonce" if config.get("use_infonce") else "bce")
    actions = {a.dest: a for a in parser._actions}
    # every table is checked, so a typo in one the run does not use is still caught
    checked = {name: checked_keys(path, table, actions, f"[{name}] ") for name, table in sections.items()}
    defaults = {**checked_keys(path, config, actions), **checked.get(loss, {})}
    if isinstance(defaults.get("data"), str):
        defaults["data"] = resolve_data_path(defaults["data"])
    return defaults


def checked_keys(path, table, actions, where=""):
    """A config table's keys as flag destinations, each a known flag, its value converted to the flag's type."""
    values = {}
    for key, value in table.items():
        key = KEY_ALIASES.get(key, key)
        action = actions.get(key)
        if action is None or key in ("config", "help"):
            raise UsageError(f"--config {path}: unknown key {where}{key!r} (keys are flag names, e.g. "
                             f"'batch_size', or tables {list(LOSSES)})")
        try:
            values[key] = typed_value(key, value, action)
        except TypeError as e:
            raise UsageError(f"--config {path}: key {where}{key!r} expects {e}, got {shown(value)}") from None
    return values


FIELDS = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
EXPECTED = {bool: ("true or false (bool)", "true or false (bool)"),  # what a key expects: a value, list elements
            int: ("int (a whole number)", "int (whole numbers)"), float: ("a number (float)", "numbers (float)"),
            str: ("a string (str)", "strings (str)")}


def typed_value(key, value, action):
    """`value` of flag `key` checked against its config field's type (a list flag's elements against the
    argparse action's type; a scalar there is a one-element tuple). Raises TypeError(what was expected)."""
    f = FIELDS.get(key)
    kind = f.type if f else bool  # use_infonce: the one flag that is no field
    if value is None and f is not None and (f.default is None or type(None) in get_args(kind)):
        return None  # only config.json holds nulls (TOML has none)
    kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
    if kind not in EXPECTED and kind is not tuple:
        return value  # a type this check does not know
    choices = list(action.choices) if action.choices else None
    if kind is not tuple:
        return _typed_scalar(value, kind, choices, f"one of {choices}" if choices else EXPECTED[kind][0])
    element, items = action.type or str, value if isinstance(value, list) else [value]
    what = f"a list of {choices or EXPECTED[element][1]}"
    return tuple(_typed_scalar(v, element, choices, what, ids=True) for v in items)


def _typed_scalar(value, kind, choices, what, ids=False):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # bool is an int to Python, not here
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str) or (ids and number and isinstance(value, int))}[kind]  # ids: mm_emb_id = [81]
    if not ok:
        raise TypeError(what)
    value = float(value) if kind is float else str(value) if kind is str else value
    if choices and value not in choices:  # argparse checks choices on the command line only, not defaults
        raise TypeError(what)
    return value


def shown(value):
    """A config value as its file wrote it (true, "big", [0.1, 0.2])."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)  # TOML dates


def resolve_data_path(path):
    """Relative data paths in configs are tried from the working directory, then from the repository root."""
    if path == "synthetic" or os.path.isabs(path) or os.path.exists(path):
        return path
    from_root = os.path.join(ROOT, path)
    return from_root if os.path.exists(from_root) else path


def checkpoint_file(path, inference_only):
    """A checkpoint directory means its best.pt (evaluation) or last.pt (resuming)."""
    if os.path.isdir(path):
        return os.path.join(path, "best.pt" if inference_only else "last.pt")
    return path


def saved_config(state_dict_path, parser):
    """The flat config saved beside a checkpoint, minus what names the current invocation."""
    path = os.path.join(os.path.dirname(checkpoint_file(state_dict_path, True)), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--state_dict_path: unreadable {path} ({e})") from None
    if not isinstance(saved, dict):
        raise UsageError(f"--state_dict_path: {path} is not a saved config (expected a JSON object)")
    saved = {KEY_ALIASES.get(k, k): v for k, v in saved.items()}
    saved.update(checked_saved(path, saved, parser))
    ckpt_dir = os.path.dirname(os.path.abspath(path))
    if saved.get("ckpt_dir") and os.path.abspath(saved["ckpt_dir"]) != ckpt_dir:  # the run was moved or copied:
        run_dir = os.path.dirname(ckpt_dir)                                        # write beside it, not where it was
        saved.update(ckpt_dir=ckpt_dir, run_dir=run_dir, log_dir=os.path.join(run_dir, "logs"),
                     tb_dir=os.path.join(run_dir, "tb"))
    flags = set(FLAG_SECTION) - set(INVOCATION_FLAGS)
    return {k: v for k, v in saved.items() if k in flags}


def checked_saved(path, saved, parser):
    """config.json's flag values (a flag the invocation names aside) checked against their types, as a config
    file's are: a hand-edited or damaged config.json gets one line naming it and the key."""
    actions, values = {a.dest: a for a in parser._actions}, {}
    for key in set(FLAG_SECTION).difference(INVOCATION_FLAGS).intersection(saved):
        try:
            values[key] = typed_value(key, saved[key], actions[key])
        except TypeError as e:
            raise UsageError(f"--state_dict_path: {path}: key {key!r} expects {e}, got {shown(saved[key])}") from None
    return values


def given(argv, *flags):
    """Whether any of `flags` appears on the command line (as --flag or --flag=value)."""
    return any(a.split("=")[0] in flags for a in argv)


def command_line_loss(ns, argv):
    if given(argv, "--loss"):
        return ns.loss
    if given(argv, "--use_infonce", "--no-use_infonce"):
        return "infonce" if ns.use_infonce else "bce"
    return None


def build_config(argv=None):
    """The run's Config from a config file, the checkpoint's saved config, defaults and flags (argv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    saved = saved_config(known.state_dict_path, parser) if known.state_dict_path else {}
    if known.finetune:  # a new run: the checkpoint's folders are not its own
        saved = {k: v for k, v in saved.items() if k not in OUTPUT_FLAGS}
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser, command_line_loss(known, argv)))
    parser.set_defaults(**saved)  # a checkpoint's own config beats a config file; the command line beats both
    ns = parser.parse_args(argv)
    if given(argv, "--loss") and given(argv, "--use_infonce") and ns.use_infonce and ns.loss != "infonce":
        raise UsageError(f"--use_infonce contradicts --loss {ns.loss} (--use_infonce means --loss infonce)")
    values = vars(ns)
    values["loss"] = command_line_loss(ns, argv) or ns.loss or ("infonce" if ns.use_infonce else "bce")
    if ns.loss_schedule:  # the schedule's last stage is the run's loss (its similarity, its [loss] table)
        last = loss_stages(ns.loss_schedule)[-1][0]
        if given(argv, "--loss", "--use_infonce") and values["loss"] != last:
            raise UsageError(f"--loss {values['loss']} contradicts --loss_schedule, whose last stage is {last}")
        values["loss"] = last
    values["similarity"] = ns.similarity or ("cosine" if values["loss"] == "infonce" else "dot")
    for key in ("item_features", "item_emb"):  # a config file may give one path or a list
        paths = values[key] or []
        values[key] = tuple(os.path.abspath(resolve_data_path(p)) for p in ([paths] if isinstance(paths, str)
                                                                              else paths))
    for key in ("mm_emb_id", "item_feature_ids", "user_feature_ids", "positive_actions", "eval_actions",
                "action_weights", "score_weights", "semantic_ids"):  # lists from flags, a config file or config.json
        if values[key] is not None:
            values[key] = tuple(values[key]) if isinstance(values[key], (list, tuple)) else (values[key],)
    if values["data"] != "synthetic":
        values["data"] = os.path.abspath(values["data"])  # the saved config must work from any directory
    if given(argv, "--predict_action") and not values["next_action"]:
        raise UsageError("--predict_action is the action type a --next_action model is asked for: give --next_action")
    for key in STRUCTURE_KEYS:
        if key in saved and values[key] != saved[key]:
            raise UsageError(f"--{key} {values[key]} contradicts the checkpoint's saved config ({key} = {saved[key]})")
    extra = {k: saved[k] for k in ("num_items", "item_side", "user_side", "num_actions") if k in saved}
    sections = {name: cls(**{f.name: values[f.name] if f.name in values else extra.get(f.name, f.default)
                             for f in dataclasses.fields(cls)}) for name, cls in SECTIONS.items()}
    config = Config(**sections)
    validate(config)
    return config


def attention_bias_kinds(text: str) -> tuple:
    """--attn_bias 'position,time' -> ('position', 'time'), in BIAS_KINDS order; '' -> ()."""
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    unknown = sorted(kinds - set(BIAS_KINDS))
    if unknown:
        raise UsageError(f"--attn_bias {text!r}: unknown kind {unknown[0]!r}; expected a comma-separated subset of "
                         f"{', '.join(BIAS_KINDS)}")
    return tuple(k for k in BIAS_KINDS if k in kinds)


def validate(c):
    """Every check of flag values, in one place."""
    m, lo, t = c.model, c.loss, c.train
    attention_bias_kinds(m.attn_bias)
    for name, value in (("maxlen", m.maxlen), ("hidden_units", m.hidden_units), ("num_blocks", m.num_blocks),
                        ("num_heads", m.num_heads), ("batch_size", t.batch_size), ("num_epochs", t.num_epochs),
                        ("eval_every", t.eval_every), ("bucket_batches", t.bucket_batches)):
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if m.hidden_units % m.num_heads:
        raise UsageError(f"--hidden_units ({m.hidden_units}) must be divisible by --num_heads ({m.num_heads})")
    if not lo.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {lo.temperature}")
    if lo.learn_temperature and lo.similarity != "cosine":
        raise UsageError("--learn_temperature needs cosine logits (--similarity cosine, the default for infonce)")
    if lo.learn_temperature and not TEMPERATURE_RANGE[0] <= lo.temperature <= TEMPERATURE_RANGE[1]:
        raise UsageError(f"--temperature {lo.temperature}: a learnt temperature starts inside "
                         f"{list(TEMPERATURE_RANGE)}")
    if lo.num_negatives < 1 or lo.hard_negatives < 0:
        raise UsageError(f"--num_negatives must be >= 1 and --hard_negatives >= 0, got {lo.num_negatives} and "
                         f"{lo.hard_negatives}")
    if not 0 <= lo.popularity_alpha <= 10:  # NaN fails too; (count + 1) ^ alpha stays finite in float64
        raise UsageError(f"--popularity_alpha must be in [0, 10], got {lo.popularity_alpha}")
    if lo.popularity_alpha != 1 and (lo.loss != "sampled_softmax" or lo.neg_sampler != "popularity"):
        raise UsageError("--popularity_alpha shapes --neg_sampler popularity's draws (--loss sampled_softmax)")
    if lo.hard_negatives_steps and lo.hard_negatives_to is None:
        raise UsageError("--hard_negatives_steps is the length of a --hard_negatives_to curriculum: give both")
    if lo.hard_negatives_to is not None and c.train.compile:
        raise UsageError("--hard_negatives_to changes K every step, and a compiled step recompiles for each K: "
                         "not with --compile")
    if lo.hard_negatives_to is not None and (lo.hard_negatives < 1 or lo.hard_negatives_to < 1
                                              or lo.hard_negatives_steps < 1):
        raise UsageError(f"--hard_negatives_to {lo.hard_negatives_to}: a curriculum from --hard_negatives K >= 1 to "
                         f"K' >= 1 over --hard_negatives_steps >= 1 steps (got K {lo.hard_negatives}, steps "
                         f"{lo.hard_negatives_steps})")
    if lo.negatives_per_position and (lo.loss != "sampled_softmax" or lo.neg_sampler != "uniform"
                                      or lo.in_batch_negatives or lo.hard_negatives or lo.gather_negatives):
        raise UsageError("--negatives_per_position is for --loss sampled_softmax with uniform negatives (not with "
                         "--neg_sampler popularity, --in_batch_negatives, --hard_negatives or --gather_negatives)")
    pool_losses = [name for name, _ in loss_stages(lo.loss_schedule)] if lo.loss_schedule else [lo.loss]
    if lo.hard_negatives and not {"infonce", "sampled_softmax", "ce"} & set(pool_losses):
        raise UsageError(f"--hard_negatives keeps the hardest negatives of a softmax loss (infonce, sampled_softmax, "
                         f"ce): --loss {lo.loss_schedule or lo.loss} has none")
    if lo.negative_queue < 0 or (lo.negative_queue and not {"infonce", "sampled_softmax"} & set(pool_losses)) \
            or (lo.negative_queue and lo.negatives_per_position):
        raise UsageError(f"--negative_queue {lo.negative_queue}: a queue is for --loss infonce or sampled_softmax "
                         f"with a shared pool (not --negatives_per_position), N >= 0")
    if lo.augment < 0 or lo.align_side_info < 0:
        raise UsageError(f"--augment and --align_side_info are weights >= 0, got {lo.augment} and "
                         f"{lo.align_side_info}")
    if lo.align_side_info and m.no_item_id:
        raise UsageError("--align_side_info aligns id embeddings with side information: not with --no_item_id")
    if t.min_delta < 0 or t.min_steps < 0:
        raise UsageError(f"--min_delta and --min_steps must be >= 0, got {t.min_delta} and {t.min_steps}")
    if not 0 <= t.ema_decay < 1:
        raise UsageError(f"--ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0 <= t.weight_decay < float("inf") or (t.weight_decay and t.optimizer == "adam"):
        raise UsageError(f"--weight_decay must be finite and >= 0, and is for --optimizer adamw / muon; got "
                         f"{t.weight_decay} "
                         f"with --optimizer {t.optimizer}")
    if not t.decay_fraction > 0:
        raise UsageError(f"--decay_fraction must be > 0, got {t.decay_fraction}")
    if not 0 <= lo.gbce_t <= 1:
        raise UsageError(f"--gbce_t must be in [0, 1], got {lo.gbce_t}")
    for name in ("dropout_rate", "item_emb_dropout", "item_id_dropout"):
        if not 0 <= getattr(m, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(m, name)}")
    if m.item_emb_dropout and m.output_emb != "tied":
        raise UsageError("--item_emb_dropout drops the table that inputs and targets share: it needs --output_emb tied")
    if m.item_emb_dropout and m.no_item_id:
        raise UsageError("--item_emb_dropout drops the item id table: --no_item_id has none")
    sid = c.data.semantic_ids
    if sid and (len(sid) != 2 or sid[0] < 1 or sid[1] < 2):
        raise UsageError(f"--semantic_ids expects L K: L >= 1 levels of K >= 2 centroids, got "
                         f"{' '.join(map(str, sid))}")
    has_side = bool(c.data.item_features or c.data.item_emb)
    folder_side = c.data.competition_folder and (c.data.mm_emb_id or c.data.item_feature_ids != ())
    for name in ("no_item_id", "item_id_dropout"):
        if getattr(m, name) and not (has_side or folder_side):
            raise UsageError(f"--{name} needs --item_features or --item_emb (a competition folder: item features or "
                             "--mm_emb_id); items would have no representation without their ids")
    if m.item_id_dropout and m.no_item_id:
        raise UsageError("--item_id_dropout drops item ids: --no_item_id has none")
    if m.output_emb == "separate" and has_side:
        raise UsageError("--output_emb separate is for id embeddings only: with --item_features / --item_emb the "
                         "item tower scores the outputs")
    for flag_name, pairs in (("action_weights", lo.action_weights), ("score_weights", c.eval.score_weights)):
        action_weights(pairs, flag_name)
    if c.data.action_threshold is not None and not c.data.action_col:
        raise UsageError("--action_threshold splits the column of --action_col: give --action_col too")
    if c.data.action_threshold is not None and not math.isfinite(c.data.action_threshold):
        raise UsageError(f"--action_threshold must be a finite number, got {c.data.action_threshold}")
    if (t.inference_only or t.finetune) and not t.state_dict_path:
        raise UsageError(f"--{'inference_only' if t.inference_only else 'finetune'} needs --state_dict_path")
    if t.inference_only and t.finetune:
        raise UsageError("--finetune trains a new run: not with --inference_only")
    if t.allow_other_data and not t.inference_only:
        raise UsageError("--allow_other_data is for --inference_only (to train on other data, use --finetune)")


def loss_stages(text):
    """'bce:5,infonce' -> (('bce', 5), ('infonce', None)): each stage's loss and epochs, the last open-ended."""
    stages = []
    parts = [p.strip() for p in text.split(",")]
    for i, part in enumerate(parts):
        name, _, epochs = part.partition(":")
        last = i == len(parts) - 1
        if name not in LOSSES or (not last and not epochs.isdigit()) or (last and epochs) or epochs == "0":
            raise UsageError(f"--loss_schedule {text!r}: stage {part!r} should be LOSS:EPOCHS (EPOCHS >= 1), the "
                             f"last stage LOSS alone; losses are {', '.join(LOSSES)}")
        stages.append((name, int(epochs) if epochs else None))
    return tuple(stages)


def action_weights(pairs, flag_name="action_weights"):
    """{action: weight} of ACTION=WEIGHT strings; one line naming the flag for a malformed pair."""
    out = {}
    for pair in pairs:
        try:
            action, weight = pair.split("=")
            out[int(action)] = float(weight)
        except ValueError:
            raise UsageError(f"--{flag_name} {pair!r}: expected ACTION=WEIGHT, e.g. 2=2.5") from None
        if out[int(action)] < 0:
            raise UsageError(f"--{flag_name} {pair!r}: a weight must be >= 0")
    return out


def with_output_dirs(config):
    """The config with every output folder named (defaults: folders of --run_dir, runs/<data>_<loss>_<time>)."""
    o = config.output
    run_dir = o.run_dir
    if not run_dir:
        data = config.data.data
        name = "synthetic" if data == "synthetic" else os.path.splitext(os.path.basename(data))[0]
        run_dir = os.path.join("runs", f"{name}_{config.loss.loss}_{time.strftime('%Y%m%d-%H%M%S')}")
    output = OutputConfig(run_dir, o.log_dir or os.path.join(run_dir, "logs"), o.tb_dir or os.path.join(run_dir, "tb"),
                          o.ckpt_dir or os.path.join(run_dir, "ckpt"))
    return dataclasses.replace(config, output=output)


def model_config_from_dict(values):
    """A ModelConfig from a saved dict (a checkpoint's, or config.json's flat keys); unknown keys ignored."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in names})
