"""Checkpoint -> user and item embeddings -> FAISS top-k -> files.

    python eval/infer.py --ckpt runs/<name>/ckpt                  # test split, top-10, exact index
    python eval/infer.py --ckpt runs/<name>/ckpt --split next     # recommend after each user's whole history
    python eval/infer.py --ckpt ... --queries q.txt --candidates c.txt --index hnsw --format csv

The model is rebuilt from the config saved beside the checkpoint; no training flag is repeated
(--maxlen, --hidden_units, --num_blocks, --num_heads, when given, only check that config).
"""
import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import ArgumentParser, RunError, UsageError, exits, first_line, make_writable_folder, resolve_device  # noqa: E402
from config import model_config_from_dict  # noqa: E402
from dataset import DataError, LeaveOneOut, history_batch, left_padded, ragged_positions  # noqa: E402
from eval.metrics import embed_users, metrics_at_k  # noqa: E402
from files import atomic_write, write_json  # noqa: E402
from model import SASRec  # noqa: E402
from readers.logs import load_interactions  # noqa: E402
from training import checkpoint  # noqa: E402

STRUCTURE_FLAGS = ("maxlen", "hidden_units", "num_blocks", "num_heads")  # optional checks of the saved config


def choose_blas_kernel(cpuinfo="/proc/cpuinfo"):
    """Name the CPU's kernel family for the OpenBLAS inside faiss-cpu wheels, unless the user did: on this
    project's Xeons it fell back to its Prescott (SSE3) kernels, about twice as slow for exact search
    (figures in docs/competition.md). Takes effect only before faiss is first imported: the entry points
    that search (main here, eval/competition.py's) call it first."""
    if "OPENBLAS_CORETYPE" in os.environ or not os.path.isfile(cpuinfo):
        return
    with open(cpuinfo) as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    kernel = "SkylakeX" if "avx512f" in flags else ("Haswell" if "avx2" in flags and "fma" in flags else None)
    if kernel:
        os.environ["OPENBLAS_CORETYPE"] = kernel


PREDICT_ACTION_HELP = "models trained with --next_action: the action type asked for (default: the saved config's)"


def asked_action(config: dict, args: argparse.Namespace) -> int:
    """The action type the last position is asked for: --predict_action, else the saved config's; one line
    (UsageError) when the model was trained on no such action."""
    if args.predict_action is not None and not config.get("next_action"):
        raise UsageError(f"--predict_action {args.predict_action}: the model of {args.ckpt} was trained without "
                         f"--next_action, so no action is asked of it")
    ask = config.get("predict_action", 1) if args.predict_action is None else args.predict_action
    if config.get("next_action") and not 0 <= ask < config["num_actions"]:
        raise UsageError(f"--predict_action {ask}: the model of {args.ckpt} knows action types "
                         f"0..{config['num_actions'] - 1}")
    return ask


def build_parser():
    p = ArgumentParser(description="Top-k retrieval with a trained SASRec checkpoint.", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (holding config.json, id_map.json, best.pt)")
    p.add_argument("--weights", default="best.pt", help="checkpoint file inside --ckpt")
    p.add_argument("--out", help="output directory (default: <run dir>/infer)")
    p.add_argument("--k", type=int, default=10, help="items returned per user")
    p.add_argument("--split", choices=("test", "valid", "next"), default="test",
                   help="histories to embed: before each user's test / validation item (metrics are computed), "
                        "or the whole history (next-item recommendations for serving)")
    p.add_argument("--queries", help="embed these sequences instead (any format the training reader accepts)")
    p.add_argument("--query_format", choices=("lines", "pairs", "delimited"), help="default: detect")
    p.add_argument("--candidates", help="file of raw item ids (whitespace / newline separated) to retrieve from")
    p.add_argument("--skip_unknown", action="store_true",
                   help="drop --queries / --candidates items missing from the checkpoint's id map (default: error)")
    p.add_argument("--keep_history", action="store_true", help="do not filter items already in the history")
    p.add_argument("--similarity", choices=("auto", "cosine", "dot"), default="auto",
                   help="auto: as the model was trained (its saved --similarity)")
    p.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat", help="flat is exact")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about 4 * sqrt(items))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    p.add_argument("--hnsw_m", type=int, default=32, help="HNSW links per node")
    p.add_argument("--ef_construction", type=int, default=200, help="HNSW build beam")
    p.add_argument("--ef_search", type=int, default=128, help="HNSW search beam")
    p.add_argument("--faiss_device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="top-k file format")
    p.add_argument("--batch_size", type=int, default=1024, help="users embedded at once")
    p.add_argument("--device", default="auto", help="torch device for the model")
    p.add_argument("--predict_action", type=int, help=PREDICT_ACTION_HELP)
    p.add_argument("--data", help="training log, if it moved since training (default: the saved config's)")
    p.add_argument("--allow_other_data", action="store_true",
                   help="accept a --data log whose content differs from the checkpoint's (its item ids must match)")
    for flag in STRUCTURE_FLAGS:  # the model is rebuilt from the saved config; these only check it
        p.add_argument(f"--{flag}", type=int, help="optional check: must equal the saved config's value")
    return p


# ----------------------------------------------------------------------------- model + data

def load_run(args: argparse.Namespace) -> tuple:
    """(saved config, id map, model, the checkpoint's data identity) of a checkpoint directory (args.ckpt,
    args.weights); the model is rebuilt from the checkpoint alone, in eval mode, and id_map.json must be the
    map it was trained with. Raises UsageError naming the file at fault. args.maxlen etc. (STRUCTURE_FLAGS,
    given to eval/infer.py), when set, must equal the saved config's."""
    paths = {name: os.path.join(args.ckpt, name) for name in ("config.json", "id_map.json", args.weights)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise UsageError(f"--ckpt {args.ckpt}: missing {name} (expected a checkpoint directory written by main.py)")
    try:
        with open(paths["config.json"]) as f:
            config = json.load(f)
        with open(paths["id_map.json"]) as f:
            id_map = json.load(f)
    except (ValueError, OSError) as e:
        raise UsageError(f"--ckpt {args.ckpt}: unreadable config.json / id_map.json ({e})") from None
    for flag in STRUCTURE_FLAGS:
        given = vars(args).get(flag)  # eval/competition.py has no such flags
        if given is not None and given != config[flag]:
            raise UsageError(f"--{flag} {given} contradicts the checkpoint's saved config ({flag} = {config[flag]})")
    asked_action(config, args)  # a bad --predict_action is refused before anything is read or written
    ckpt = checkpoint.load(paths[args.weights], "--ckpt")
    checkpoint.check_model_config(ckpt, model_config_from_dict(config), paths[args.weights], "--ckpt")
    checkpoint.check_id_map(ckpt.get("data"), id_map.get("items", []), paths["id_map.json"], paths[args.weights])
    try:
        model = SASRec.from_checkpoint(ckpt)
    except Exception as e:  # weights of another shape than the saved model config
        raise UsageError(f"--ckpt {paths[args.weights]}: not a loadable checkpoint for this config "
                         f"({type(e).__name__}: {first_line(e)})") from None
    return config, id_map, model, ckpt.get("data")


def training_histories(config: dict, id_map: dict, args: argparse.Namespace,
                       trained_on: Optional[dict] = None) -> tuple:
    """(user raw ids, flat item array, history ends, history lengths, targets or None, eval.metrics' histories
    function) from the training log, which must be the one the checkpoint was trained on (`trained_on`: its
    data identity), or, with --allow_other_data, a log with the same item ids. The histories carry the log's
    context (event times, actions), as in training's evaluation."""
    path = args.data or config["data"]
    if os.path.isdir(path) or config.get("data_format") == "taac":
        raise UsageError(f"--ckpt {args.ckpt}: trained on the competition folder {path}; its inference is "
                         f"eval/competition.py --ckpt {args.ckpt} --eval_data <evaluation folder>")
    data = load_interactions(path, config.get("data_format"), config.get("cache_dir") or None,
                             config.get("user_col"), config.get("item_col"), config.get("time_col"),
                             config.get("id_type", "auto"), action_col=config.get("action_col"),
                             action_threshold=config.get("action_threshold"))
    if data.item_ids.tolist() != id_map["items"]:
        raise UsageError(f"--data {path}: its item ids differ from the checkpoint's id_map.json (was the log "
                         f"changed?); --queries scores other sequences by raw item id")
    if trained_on and not args.allow_other_data:
        checkpoint.check_same_data(trained_on, checkpoint.data_identity(data), path, args.ckpt,
                                   {"items": "", "content": "--allow_other_data evaluates on it anyway"})
    if args.split == "next":  # the next event's time is unknown: each history's last event is the prediction time
        users, ends, lengths, targets, known_end = np.arange(len(data.lengths)), data.offsets[1:], data.lengths, None, 0
    else:
        users, ends, lengths, targets = LeaveOneOut(data).eval_arrays(args.split)
        known_end = 1

    ask = asked_action(config, args)

    def histories(rows, clipped, width):
        return history_batch(data, users[rows], ends[rows], clipped, width, known_end=ends[rows] + known_end,
                             predict_action=ask)
    return data.user_ids[users], data.items, ends, lengths, targets, histories


def query_histories(id_map: dict, args: argparse.Namespace) -> tuple:
    """Sequences from --queries mapped through the saved id map (unknown items: an error, or --skip_unknown),
    as training_histories' tuple (targets None)."""
    data = load_interactions(args.queries, args.query_format, id_type="str")  # matched to the id map as strings
    index = {raw: i + 1 for i, raw in enumerate(id_map["items"])}
    raw_items = data.item_ids[data.items - 1]
    mapped = np.array([index.get(r, 0) for r in raw_items], np.int64)
    unknown = mapped == 0
    if unknown.any():
        examples = sorted(set(raw_items[unknown].tolist()))
        user = data.user_ids[np.searchsorted(data.offsets, np.flatnonzero(unknown)[0], side="right") - 1]
        if not args.skip_unknown:
            raise UsageError(f"--queries {args.queries}: item {examples[0]!r} (user {str(user)!r}) is not in the "
                             f"checkpoint's id map of {len(index)} items; {len(examples)} unknown item ids in all "
                             f"(--skip_unknown drops them)")
        print(f"{args.queries}: {int(unknown.sum())} interactions with {len(examples)} item ids unknown to the "
              f"checkpoint skipped (e.g. {examples[:5]})")
    owner = np.repeat(np.arange(data.num_users), data.lengths)[~unknown]
    items = mapped[~unknown]
    lengths = np.bincount(owner, minlength=data.num_users)
    empty = lengths == 0
    if empty.any():
        print(f"{args.queries}: {int(empty.sum())} users with no known item skipped "
              f"(e.g. {data.user_ids[empty][:5].tolist()})")
    if empty.all():
        raise UsageError(f"--queries {args.queries}: no sequence has an item the checkpoint knows")
    ends = np.cumsum(lengths)
    keep = ~empty
    return data.user_ids[keep], items, ends[keep], lengths[keep], None


def candidate_items(id_map: dict, args: argparse.Namespace) -> np.ndarray:
    """(K,) int64 item indices to retrieve from, ascending: all items, or the known ids of --candidates."""
    if not args.candidates:
        return np.arange(1, len(id_map["items"]) + 1)
    try:
        with open(args.candidates, encoding="utf-8") as f:
            rows = [(lineno, r) for lineno, line in enumerate(f, 1) for r in line.split()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--candidates {args.candidates}: cannot read as text "
                         f"({getattr(e, 'strerror', None) or e})") from None
    index = {r: i + 1 for i, r in enumerate(id_map["items"])}
    raw = [r for _, r in rows]
    unknown = sorted({r for r in raw if r not in index})
    if unknown and not args.skip_unknown:
        lineno, first = next((n, r) for n, r in rows if r not in index)
        raise UsageError(f"--candidates {args.candidates}:{lineno}: item {first!r} is not in the checkpoint's id map "
                         f"of {len(index)} items; {len(unknown)} unknown item ids in all (--skip_unknown drops them)")
    if unknown:
        print(f"{args.candidates}: {len(unknown)} item ids unknown to the checkpoint skipped (e.g. {unknown[:5]})")
    found = np.unique([index[r] for r in raw if r in index]).astype(np.int64)
    if len(found) == 0:
        raise UsageError(f"--candidates {args.candidates}: no known item id")
    return found


# ----------------------------------------------------------------------------- embeddings + search

def padded_histories(items: np.ndarray, ends: np.ndarray):
    """eval.metrics' histories(rows, lengths, width) over a flat item array: (B, width) left-padded item ids,
    user r's history being the `lengths` items before ends[r] (item ids alone, no context)."""
    return lambda rows, lengths, width: torch.from_numpy(left_padded(items, ends[rows], lengths, width))


@torch.no_grad()
def embed_items(model: SASRec, item_idx: np.ndarray, normalize: bool) -> np.ndarray:
    """(K, D) float32 vectors the users are scored against, of the (K,) item indices (model on the CPU)."""
    return model.item_embeddings(torch.from_numpy(item_idx), normalize).float().numpy()


def faiss_gpu_available() -> bool:
    import faiss
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def build_index(vectors: np.ndarray, kind: str, faiss_device: str = "auto", nlist: int = 0, nprobe: int = 32,
                hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128, verbose: bool = True):
    """Inner-product FAISS index over `vectors` ((K, D) float32, rows = items): kind 'flat' (exact), 'ivf' or
    'hnsw'; on the GPU when faiss_device says so (UsageError if it cannot)."""
    import faiss
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    use_gpu = faiss_device == "gpu" or (faiss_device == "auto" and faiss_gpu_available())
    if use_gpu and not faiss_gpu_available():
        raise UsageError("--faiss_device gpu: this FAISS build has no GPU support or no CUDA device is visible "
             "(install faiss-gpu on a CUDA machine, or use --faiss_device cpu)")
    if use_gpu and kind == "hnsw":
        if verbose:
            print("faiss: HNSW has no GPU implementation; searching on CPU")
        use_gpu = False
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(vectors)
    if verbose:
        print(f"faiss: {kind} index over {n} items (d={d}) on {'GPU' if use_gpu else 'CPU'}")
    return index


# FAISS's exact search only uses BLAS when a call's queries x dim >= 128,000 (its
# distance_compute_blas_threshold); below that it loops over queries one by one, several times slower
# (docs/performance.md, "Retrieval").
SEARCH_BATCH = 8192


def search(index, user_vecs: np.ndarray, k: int, exclude: Optional[list] = None,
           batch_size: int = SEARCH_BATCH) -> tuple:
    """(ids (U, k) int64, scores (U, k) float32): top-k positions in the index per user (-1 / -inf where fewer
    remain), skipping each user's `exclude` positions.

    exclude: list of int arrays (index positions to filter per user) or None. The search goes k + the
    batch's longest exclusion list deep, so k results remain after filtering whenever the index has them.
    """
    n = index.ntotal
    ids = np.full((len(user_vecs), k), -1, np.int64)
    scores = np.full((len(user_vecs), k), -np.inf, np.float32)
    # equal-sized batches, so no small tail batch falls below FAISS's BLAS threshold
    bounds = np.linspace(0, len(user_vecs), -(-len(user_vecs) // batch_size) + 1).astype(np.int64)
    for s, e in tqdm(zip(bounds[:-1], bounds[1:], strict=False), total=len(bounds) - 1, desc="search",
                     disable=not sys.stderr.isatty()):
        depth = min(n, k + (max(map(len, exclude[s:e])) if exclude is not None else 0))
        d, i = index.search(np.ascontiguousarray(user_vecs[s:e]), depth)
        if exclude is not None:  # (row, position) keys: one vectorised membership test per batch
            lens = np.fromiter(map(len, exclude[s:e]), np.int64, len(i))
            ex_keys = np.repeat(np.arange(len(i)), lens) * n + np.concatenate(exclude[s:e] + [np.empty(0, np.int64)])
            ex = np.isin(np.arange(len(i))[:, None] * n + i, ex_keys) & (i >= 0)
            d, i = np.where(ex, -np.inf, d), np.where(ex, -1, i)
            order = np.argsort(-d, axis=1, kind="stable")[:, :k]
            d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        ids[s:e, :i.shape[1]], scores[s:e, :d.shape[1]] = i[:, :k], d[:, :k]
    return ids, scores


def history_positions(items: np.ndarray, ends: np.ndarray, lengths: np.ndarray, cands: np.ndarray,
                      num_items: int) -> list:
    """Per user, the index positions (in the candidate list) of the items in their history."""
    position = np.full(num_items + 1, -1, np.int64)
    position[cands] = np.arange(len(cands))
    _, idx = ragged_positions(ends - lengths, lengths)
    hist = position[items[idx]]
    return [h[h >= 0] for h in np.split(hist, np.cumsum(lengths)[:-1])]


# ----------------------------------------------------------------------------- outputs

def check_finite(vectors: np.ndarray, ids, what: str) -> None:
    """No output file may hold a NaN / infinite row: one line naming the first (`ids`: the rows' raw ids)."""
    bad = ~np.isfinite(vectors).all(1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise RunError(f"{what} {ids[first]}'s vector is not finite ({int(bad.sum())} of {len(bad)} {what} vectors); "
                       f"nothing written (non-finite weights in the checkpoint, or non-finite inputs?)")


def write_outputs(out: str, fmt: str, user_ids, item_ids: np.ndarray, cands: np.ndarray, top_ids: np.ndarray,
                  top_scores: np.ndarray, user_vecs: np.ndarray, item_vecs: np.ndarray,
                  metrics: Optional[dict] = None) -> None:
    """Into folder `out`, each file written atomically: top-k per user (raw ids; top_ids / top_scores (U, k), -1
    where none) as topk.jsonl or .csv (`fmt`), user_emb.npy (U, D) with user_ids.json, item_emb.npy (K, D) with
    item_ids.json (item_ids: index -> raw id; cands: the K indices), metrics.json unless metrics is None."""
    def write_topk(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            if fmt == "csv":
                f.write("user,rank,item,score\n")
            for u, row_ids, row_scores in zip(user_ids, top_ids, top_scores, strict=True):
                keep = row_ids >= 0
                items, scores = item_ids[row_ids[keep]].tolist(), row_scores[keep].tolist()
                if fmt == "csv":
                    ranked = enumerate(zip(items, scores, strict=True), 1)
                    f.writelines(f"{u},{r},{i},{sc:.6f}\n" for r, (i, sc) in ranked)
                else:
                    row = {"user": str(u), "items": items, "scores": [round(x, 6) for x in scores]}
                    f.write(json.dumps(row) + "\n")

    def save_npy(array):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, array)
        return write

    atomic_write(os.path.join(out, f"topk.{fmt}"), write_topk)
    atomic_write(os.path.join(out, "user_emb.npy"), save_npy(user_vecs))
    write_json(os.path.join(out, "user_ids.json"), [str(u) for u in user_ids])
    atomic_write(os.path.join(out, "item_emb.npy"), save_npy(item_vecs))
    write_json(os.path.join(out, "item_ids.json"), item_ids[cands].tolist())
    if metrics is not None:
        write_json(os.path.join(out, "metrics.json"), metrics)


@exits
def main(argv: Optional[list] = None) -> None:
    """eval/infer.py's command line (see the module docstring); errors exit with one line (cli.exits)."""
    choose_blas_kernel()
    args = build_parser().parse_args(argv)
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    config, id_map, model, trained_on = load_run(args)
    device = resolve_device(args.device)
    model.to(device)
    normalize = (config.get("similarity") if args.similarity == "auto" else args.similarity) == "cosine"
    try:
        if args.queries:
            if model.time_bias:
                raise UsageError(f"--queries: the model of {args.ckpt} has a time attention bias (attn_bias "
                                 f"{config['attn_bias']}), and a query file has no event times; embed the log's "
                                 f"users instead (no --queries)")
            if config.get("next_action"):
                raise UsageError(f"--queries: the model of {args.ckpt} is conditioned on the next action "
                                 f"(next_action), and a query file has no action types; embed the log's users instead "
                                 f"(no --queries)")
            user_ids, items, ends, lengths, targets = query_histories(id_map, args)
            histories = padded_histories(items, ends)
        else:
            user_ids, items, ends, lengths, targets, histories = training_histories(config, id_map, args, trained_on)
    except DataError as e:
        raise UsageError(str(e)) from None
    cands = candidate_items(id_map, args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "infer")
    make_writable_folder(out, "--out")

    user_vecs = embed_users(model, histories, lengths, device, normalize, args.batch_size)
    item_vecs = embed_items(model.cpu(), cands, normalize)
    check_finite(user_vecs, user_ids, "user")
    check_finite(item_vecs, np.array([""] + id_map["items"], dtype=object)[cands], "item")
    index = build_index(item_vecs, args.index, args.faiss_device, args.nlist, args.nprobe, args.hnsw_m,
                        args.ef_construction, args.ef_search)
    exclude = None if args.keep_history else history_positions(items, ends, lengths, cands, len(id_map["items"]))
    top, scores = search(index, user_vecs, args.k, exclude)
    top_items = np.where(top >= 0, cands[np.maximum(top, 0)], 0)
    metrics = None
    if targets is not None:
        hit = top_items == targets[:, None]
        ranks = np.where(hit.any(1), hit.argmax(1), args.k)  # k means "not in the top k"
        metrics = metrics_at_k(ranks, args.k)
        metrics.update(users=int(len(ranks)), split=args.split, index=args.index, similarity=
                       "cosine" if normalize else "dot")
        print("metrics: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    item_raw = np.array([""] + id_map["items"], dtype=object)  # item index -> raw id
    write_outputs(out, args.format, user_ids, item_raw, cands, np.where(top >= 0, top_items, -1), scores,
                  user_vecs, item_vecs, metrics)
    print(f"wrote top-{args.k} for {len(user_ids)} users to {out}")


if __name__ == "__main__":
    main()
