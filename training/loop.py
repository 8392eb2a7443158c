"""The training loop: epochs of steps, validation every --eval_every, checkpoints, early stopping or the
plateau schedule's final decay.

    fit(model, loss, sampler, optimizer, split, config, device, state)

Under torchrun every rank trains and validates a share; rank 0 alone writes logs, TensorBoard and
checkpoints. The loss is read back from the device every SYNC_EVERY steps (and at the end of an
epoch), not every step; a non-finite loss found there stops the run before any checkpoint is written.
"""
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import distributed
from cli import RunError, UsageError, amp_dtype, first_line
from config import action_weights
from dataset import TrainBatches
from eval.metrics import encode_floats, evaluate, model_scorer
from files import remove_stale_temp_files
from objectives import auxiliary
from objectives.losses import ScheduledLoss, SoftmaxLoss, hard_negatives_at
from objectives.samplers import BatchNegatives
from training import checkpoint

SYNC_EVERY = 20  # steps between host read-backs of the loss (and TensorBoard points)


@dataclass
class LoopState:
    """Saved in every checkpoint. epoch: epochs finished; batch: batches done in the next one (> 0 after an
    interrupt); rng: the torch random state at that batch; world: the process count that state is for."""
    epoch: int = 0
    step: int = 0
    batch: int = 0
    rng: Any = None
    world: int = 1
    best_epoch: int = 0
    best_ndcg: float = -1.0
    bad_evals: int = 0
    ref_ndcg: float = -1.0  # the NDCG@10 that reset bad_evals last (--min_delta measures progress from it)
    decay_from: int = 0    # plateau schedule: the epoch its final decay began after (0: not yet)
    decay_epochs: int = 0  # and how many epochs that decay lasts
    finished: str = ""     # why the run ended ("epochs", "early_stop", "decay"), "" while it goes on

    def decay_over(self):
        return self.decay_epochs > 0 and self.epoch >= self.decay_from + self.decay_epochs

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(**{"ref_ndcg": ckpt.get("best_ndcg", -1.0),  # checkpoints older than --min_delta
                      **{k: ckpt[k] for k in cls.__dataclass_fields__ if k in ckpt}})


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM only raise a flag: the loop ends its step, saves a resumable checkpoint, exits.
    A second signal acts as usual and aborts at once (checkpoints are written atomically either way)."""
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


class NullWriter:
    """SummaryWriter's stand-in on ranks other than 0 (and in benchmarks): logs nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    add_histogram = add_scalar


class TrainStep(nn.Module):
    """Model + loss as one module whose forward(batch) returns the LossOutput: what DDP wraps (DDP
    synchronises the gradients of what its wrapped forward computed). `compiled`: torch.compile it,
    eager if the first (compiling) call fails. `autocast_dtype` (--amp): the encoder runs under autocast
    to it; the loss sees fp32 states (its pool matmuls take their dtype from the loss's Similarity)."""

    def __init__(self, model, loss, sampler, l2_emb=0.0, compiled=False, augment=0.0, augmentations=(),
                 align_side_info=0.0, autocast_dtype=None):
        super().__init__()
        self.model, self.loss, self.sampler, self.autocast_dtype = model, loss, sampler, autocast_dtype
        # --l2_emb, --augment, --align_side_info: resolved here, once; the step adds only those that are on
        self.extras = auxiliary.extra_losses(l2_emb, augment, augmentations, align_side_info)
        self.compiled = torch.compile(self.eager) if compiled else None
        self.compile_checked = False

    def eager(self, batch, with_logits=False):
        with self.model.target_tower.dropout_step():  # --item_emb_dropout / --item_id_dropout masks (tied only)
            return self.step(batch, with_logits)

    def step(self, batch, with_logits):
        with torch.autocast(batch.inputs.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            states = self.model.encode(batch)
        # index_select on flat indices, not states[real]: a boolean index's backward (index_put) took 3x on CPU
        states = states.float().flatten(0, 1).index_select(0, batch.rows)
        pos_ids = batch.positives.view(-1).index_select(0, batch.rows)
        per_position = None if batch.negatives is None else batch.negatives.view(-1).index_select(0, batch.rows)
        negatives = BatchNegatives(self.sampler, batch.rows, tuple(batch.positives.shape), per_position)
        out = self.loss(states, pos_ids, self.model.target_tower, negatives, with_logits, batch.weights)
        for field, weight, term in self.extras:
            value = term(self.model, batch, pos_ids)
            if field:
                setattr(out, field, value)  # unweighted, for TensorBoard
            out.loss = out.loss + weight * value
        return out

    def forward(self, batch, with_logits=False):
        if self.compiled is None:
            return self.eager(batch, with_logits)
        if self.compile_checked:
            return self.compiled(batch, with_logits)
        try:  # compilation happens on the first call: only its failure falls back (no toolchain, unsupported op)
            out = self.compiled(batch, with_logits)
            self.compile_checked = True
            return out
        except Exception as e:
            print(f"warning: --compile failed ({type(e).__name__}: {first_line(e)}); continuing without it")
            self.compiled = None
            return self.eager(batch, with_logits)


def target_weights(loss_config, data):
    """(max action + 1,) loss weight of a target by its action (0: never a target), from --positive_actions
    and --action_weights; None when every target weighs 1 (or the log has no actions)."""
    if data.actions is None or not (loss_config.positive_actions or loss_config.action_weights):
        return None
    weights = np.ones(int(data.actions.max()) + 1, np.float32)
    for action, weight in action_weights(loss_config.action_weights).items():
        if action < len(weights):
            weights[action] = weight
    if loss_config.positive_actions:
        weights[~np.isin(np.arange(len(weights)), loss_config.positive_actions)] = 0
    return weights


def make_step(model, loss, sampler, config, device):
    """The training step module: TrainStep, DDP-wrapped under torchrun."""
    lo = config.loss
    step = TrainStep(model, loss, sampler, lo.l2_emb, compiled=config.train.compile and device.type == "cuda",
                     augment=lo.augment, augmentations=lo.augmentations, align_side_info=lo.align_side_info,
                     autocast_dtype=amp_dtype(device, config.train.amp))
    if distributed.world_size() == 1:
        return step
    # The buffers (item side codes, sampler tables) are constants: nothing to broadcast every step.
    return DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def seed_epoch(seed, epoch, rank=0):
    """Every epoch draws from its own seeded streams, so a resumed run repeats the uninterrupted one exactly.
    Under torchrun the numpy stream (which users, in which order) is shared; torch's (dropout) is per rank."""
    torch.manual_seed(seed * 1_000_003 + epoch + rank * 1_000_000_007)
    return np.random.default_rng([seed, epoch])


def learning_rate(train_config, state, steps_per_epoch):
    """The learning rate of step state.step: constant, cosine over --num_epochs, or (plateau) constant until
    validation starts the final decay, then cosine over that decay's epochs."""
    lr, schedule = train_config.lr, train_config.lr_schedule
    if schedule == "cosine":
        progress = state.step / (train_config.num_epochs * steps_per_epoch)
    elif schedule == "plateau" and state.decay_epochs:
        progress = (state.step - state.decay_from * steps_per_epoch) / (state.decay_epochs * steps_per_epoch)
    else:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


class LossMeter:
    """Per-step losses kept on the device and read back in one transfer per SYNC_EVERY steps. Under
    torchrun the read-back is one all-reduce of every rank's window (rows, summed loss, stop flag)."""

    def __init__(self, device):
        self.device, self.losses, self.rows, self.total_loss, self.total_rows = device, [], [], 0.0, 0.0

    def add(self, loss, rows):
        self.losses.append(loss.detach())
        self.rows.append(rows)

    def read(self, first_step, epoch, stop_flag=False):
        """Sum the pending steps over ranks; raise on a non-finite loss naming its step. Returns (the last
        step's mean loss, whether any rank has a stop flag)."""
        rows = torch.tensor(self.rows, dtype=torch.float64, device=self.device)
        flags = torch.zeros_like(rows)
        flags[-1] = float(bool(stop_flag))
        window = torch.stack([rows, torch.stack(self.losses).double() * rows, flags], 1)
        totals = distributed.sum_all(window).tolist()
        self.losses, self.rows = [], []
        for i, (rows, loss, _) in enumerate(totals):
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss / rows}) at epoch {epoch}, step {first_step + i}")
        self.total_rows += sum(r for r, _, _ in totals)
        self.total_loss += sum(loss for _, loss, _ in totals)
        rows, loss, _ = totals[-1]
        return loss / max(rows, 1), any(flag for _, _, flag in totals)

    def mean(self):
        return self.total_loss / max(self.total_rows, 1)


def train_epoch(step, optimizer, batches, config, device, state, writer, stop, average=None):
    """Epoch state.epoch + 1, from batch state.batch on (0, or where an interrupted run stopped); `average`
    (--ema_decay) folds in the weights after every optimizer step.

    Advances state.step and state.batch; returns early, mid-epoch, once `stop` has a signal (on any rank:
    every rank then stops after the same step). Under torchrun each rank's loss is weighted by its share
    of the step's rows, so the averaged gradient is that of one process on all ranks' batches.
    Returns (mean loss, sequences / s, seconds)."""
    epoch, world, train = state.epoch + 1, distributed.world_size(), config.train
    if state.batch and state.world != world:
        raise UsageError(f"--state_dict_path: the checkpoint was interrupted mid-epoch with {state.world} "
                         f"process(es); resume it with the same number ({world} now)")
    step.train()
    loss_module = getattr(step, "module", step).loss
    if isinstance(loss_module, ScheduledLoss):
        loss_module.epoch = epoch
    batch_iter = batches.epoch(seed_epoch(train.seed, epoch, distributed.rank()))
    if state.batch:  # replay the interrupted part's draws, so the rest of the epoch matches exactly
        for _ in range(state.batch):
            next(batch_iter)
        checkpoint.set_rng_state(state.rng)
    meter, seen, start, window_start = LossMeter(device), 0, time.perf_counter(), state.step + 1
    bar = tqdm(batch_iter, total=len(batches), initial=state.batch, desc=f"epoch {epoch}", leave=False,
               disable=not sys.stderr.isatty() or not distributed.is_main())
    for i, batch in enumerate(bar, start=state.batch + 1):
        batch = batch.to(device)
        log_now = (state.step + 1) % SYNC_EVERY == 0
        if config.loss.hard_negatives_to is not None:  # a function of the step: a resumed run repeats it
            set_hard_negatives(loss_module, hard_negatives_at(config.loss, state.step))
        out = step(batch, with_logits=log_now)
        rows = len(batch.rows)
        loss = out.loss
        if train.loss_reduction == "position":  # every position weighs the same, however long its batch
            loss = loss * (rows / batches.mean_rows)
        elif world > 1:  # this rank's share of all ranks' rows (an all-reduce, no host read-back)
            all_rows = distributed.sum_all(torch.tensor([float(rows)], dtype=torch.float64, device=device))
            loss = loss * (rows * world / all_rows[0]).to(loss.dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(train, state, len(batches))
        optimizer.step()
        meter.add(out.loss, rows)
        state.step += 1
        if average is not None:
            average.update(state.step)
        state.batch += 1
        seen += batch.num_users * world
        local_stop = world == 1 and stop.received  # one process: no need to wait for a read-back
        if log_now or i == len(batches) or local_stop:
            last_loss, signalled = meter.read(window_start, epoch, stop.received)
            window_start = state.step + 1
            if log_now:
                log_logits(writer, state.step, last_loss, out, loss_module, train.hist_every)
                bar.set_postfix(loss=f"{last_loss:.4f}", seq_s=f"{seen / (time.perf_counter() - start):.0f}")
            if signalled:
                stop.received = stop.received or "signal on another rank"
                break
    seconds = time.perf_counter() - start
    return meter.mean(), seen / seconds, seconds


def set_hard_negatives(loss_module, k):
    """--hard_negatives_to's curriculum: every softmax loss in `loss_module` (each stage of a schedule) keeps K."""
    for module in loss_module.modules():
        if isinstance(module, SoftmaxLoss):
            module.hard_negatives = k


def log_logits(writer, step, loss, out, loss_module, hist_every):
    writer.add_scalar("train/loss", loss, step)
    for name in ("augment_loss", "align_loss"):
        if getattr(out, name) is not None:
            writer.add_scalar(f"train/{name}", getattr(out, name).item(), step)
    for name, x in (("pos", out.pos_logits), ("neg", out.neg_logits)):
        x = x.float()
        writer.add_scalar(f"logits/{name}_mean", x.mean().item(), step)
        writer.add_scalar(f"logits/{name}_std", x.std().item() if x.numel() > 1 else 0.0, step)
        if hist_every and step % hist_every == 0:
            writer.add_histogram(f"logits/{name}", x.cpu(), step)
    if loss_module.similarity.cosine:
        writer.add_scalar("train/temperature", loss_module.similarity.temperature().item(), step)


def run_evaluation(model, split, config, device, which, sharded=False):
    """Metrics of `model` on `which`; `sharded`: split over the torchrun ranks, rank 0 gets them (others None)."""
    model.eval()
    score = model_scorer(model, split.data, device, cosine=config.cosine, predict_action=config.eval.predict_action)
    e = config.eval
    return evaluate(score, split, which, exclude_history=not e.keep_history, sampled=e.sampled_metrics,
                    seed=config.train.seed, rare_below=e.rare_below, sharded=sharded,
                    encode_cost=lambda width: encode_floats(config.model, width),
                    score_weights=action_weights(e.score_weights, "score_weights"))


def format_metrics(m, keys=("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR", "score", "weighted_score")):
    return " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


class Interrupted(Exception):
    """A signal stopped training; the checkpoint is saved. main() prints the message and exits 130."""


def training_batches(split, config, sampler=None):
    """This rank's TrainBatches; `sampler`: draws one negative per position (losses that ask for it)."""
    return TrainBatches(split, config.model.maxlen, config.train.batch_size, config.train.bucket_batches,
                        rank=distributed.rank(), world=distributed.world_size(), sampler=sampler,
                        target_weights=target_weights(config.loss, split.data))


def check_trainable(split, config):
    """Before anything is written: a log whose training part has no target (e.g. --positive_actions that
    never occur) or too few users for the processes is one line; users without a target are counted."""
    batches = training_batches(split, config)
    if batches.users_without_target:
        print(f"{batches.users_without_target} users have no training target (no event of --positive_actions "
              f"{list(config.loss.positive_actions or [])} after their first): left out of training")
    if len(batches.users) == 0:
        raise UsageError(f"{config.data.data}: no training target: no user has a target event in its training part "
                         f"(--positive_actions {list(config.loss.positive_actions or [])}; the last two events of "
                         f"each user are held out)")
    if len(batches) == 0:  # every rank computes the same: all stop here
        raise UsageError(f"{config.data.data}: {len(batches.users)} trainable users make fewer batches of "
                         f"--batch_size {config.train.batch_size} than the {distributed.world_size()} processes "
                         f"(each needs one a step)")


def fit(model, loss, sampler, optimizer, split, config, device, state: LoopState, average=None, trained_on=None):
    """Epochs until --num_epochs or early stopping. Under torchrun rank 0 alone writes files. `average`: a
    WeightAverage (--ema_decay), the model validated and saved as best.pt's weights; `trained_on`: the data's
    checkpoint.data_identity, if the caller has it already."""
    main_rank, out = distributed.is_main(), config.output
    batches = training_batches(split, config, sampler if loss.per_position_negatives else None)
    if len(batches) == 0:  # every rank computes the same: all stop here
        check_trainable(split, config)
    step = make_step(model, loss, sampler, config, device)
    last_path = os.path.join(out.ckpt_dir, "last.pt")
    trained_on = trained_on or checkpoint.data_identity(split.data)
    save = lambda path: checkpoint.save(path, model, loss, optimizer, state, average, trained_on)  # noqa: E731
    validated = model if average is None else average.model
    if main_rank:
        remove_stale_temp_files(out.ckpt_dir)
    log_path = os.path.join(out.log_dir, "train.log") if main_rank else os.devnull
    with SummaryWriter(out.tb_dir) if main_rank else NullWriter() as writer, open(log_path, "a") as log, \
            GracefulStop() as stop:
        while state.epoch < config.train.num_epochs:
            epoch = state.epoch + 1
            try:
                epoch_loss, seq_per_s, seconds = train_epoch(step, optimizer, batches, config, device, state, writer,
                                                             stop, average)
            except FloatingPointError as e:  # nothing is saved: the checkpoints on disk predate the failure
                raise RunError(f"{e}; training stopped, checkpoints left as they were ({last_path})") from None
            if stop.received and state.batch < len(batches):
                state.rng, state.world = checkpoint.rng_state(), distributed.world_size()
                save(last_path)
                raise Interrupted(resume_hint(stop, state, epoch, len(batches), out.ckpt_dir))
            state.epoch, state.batch, state.rng = epoch, 0, None
            for name, value in (("epoch_loss", epoch_loss), ("lr", optimizer.param_groups[0]["lr"]),
                                ("sequences_per_s", seq_per_s)):
                writer.add_scalar(f"train/{name}", value, epoch)
            record = {"epoch": epoch, "step": state.step, "loss": epoch_loss, "seq_per_s": seq_per_s,
                      "seconds": seconds, "users_without_target": batches.users_without_target}
            line = f"epoch {epoch:4d}  loss {epoch_loss:.4f}  {seq_per_s:7.0f} seq/s  {seconds:5.1f}s"
            if isinstance(loss, ScheduledLoss):
                record["loss_name"] = loss.name(epoch)
                line += f"  ({record['loss_name']})"
            stop_early = False
            if epoch % config.train.eval_every == 0 or epoch == config.train.num_epochs or state.decay_over():
                record["valid"], stop_early = validate(validated, split, config, device, state, writer, save)
                if main_rank:
                    line += f"  valid {format_metrics(record['valid'])}{'  *' if state.best_epoch == epoch else ''}"
            record["peak_rss_mb"] = round(peak_rss_mb(), 1)  # after validation: its memory counts too
            state.finished = ("early_stop" if stop_early else "decay" if state.decay_over()
                              else "epochs" if epoch >= config.train.num_epochs else "")
            save(last_path)
            print(line, flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if distributed.any_rank(stop.received, device):  # decided together: no rank left in a collective
                stop.received = stop.received or "signal on another rank"
                raise Interrupted(resume_hint(stop, state, epoch + 1, len(batches), out.ckpt_dir))
            if stop_early:
                print(f"early stop: no better validation NDCG@10 for {config.train.patience} evaluations")
                break
            if state.decay_over():
                print(f"the final learning-rate decay ({state.decay_epochs} epochs from epoch {state.decay_from}) "
                      f"is over; best validation NDCG@10 {state.best_ndcg:.4f} at epoch {state.best_epoch}")
                break


def validate(model, split, config, device, state, writer, save):
    """Validation metrics; saves best.pt on a new best NDCG@10. Returns (metrics, whether to stop early).
    Under torchrun the ranks score shares of the users; rank 0 decides and tells the others whether to stop."""
    valid = run_evaluation(model, split, config, device, "valid", sharded=True)
    if not distributed.is_main():  # rank 0 decides; every rank follows its stop and its decay
        stop, state.decay_from, state.decay_epochs = distributed.broadcast(None)
        return {}, stop
    stop = False
    for k, v in valid.items():
        writer.add_scalar(f"valid/{k}", v, state.epoch)
    ndcg = valid["NDCG@10"]
    if ndcg > state.best_ndcg:
        state.best_epoch, state.best_ndcg = state.epoch, ndcg
    if ndcg > state.ref_ndcg * (1 + config.train.min_delta):  # progress: patience starts over
        state.ref_ndcg, state.bad_evals = ndcg, 0
    else:
        state.bad_evals += 1
        stop = state.bad_evals >= config.train.patience
    if state.best_epoch == state.epoch:  # after the counters: best.pt carries them too
        save(os.path.join(config.output.ckpt_dir, "best.pt"))
    if stop and config.train.lr_schedule == "plateau":  # a plateau starts the final decay; its end stops training
        stop = False
        start_final_decay(state, config.train)
    return valid, distributed.broadcast((stop, state.decay_from, state.decay_epochs))[0]


def start_final_decay(state, train_config):
    """Plateau schedule: the decay over decay_fraction x the epochs so far begins now, once, after min_steps."""
    if state.decay_epochs or state.step < train_config.min_steps:
        return
    state.decay_from, state.bad_evals = state.epoch, 0
    state.decay_epochs = max(train_config.eval_every, round(train_config.decay_fraction * state.epoch))
    print(f"validation plateau at epoch {state.epoch}: the learning rate decays to 0 over {state.decay_epochs} epochs")


def resume_hint(stop, state, epoch, num_batches, ckpt_dir):
    world = distributed.world_size()
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return (f"{stop.received}: stopped at epoch {epoch}, batch {state.batch}/{num_batches} (step {state.step}); "
            f"checkpoint saved. Resume with: {launcher} main.py --state_dict_path {ckpt_dir}")

