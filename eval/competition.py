"""Competition inference: a checkpoint + the competition's evaluation folder -> top-10 creatives per user.

    python eval/competition.py --ckpt runs/<name>/ckpt --eval_data DIR/eval [--hnsw] [--[no-]keep_history] [--out DIR]

The evaluation folder is either layout: predict_seq.jsonl + predict_set.jsonl (+ indexer.pkl,
item_feat_dict.json, creative_emb/), or the 2026 release's seq/, user_feat/, item_feat/, mm_emb/,
indexer.pkl + candidate/. Each user's whole sequence is the query, most recent event included; the
prediction time is unknown, so the last event's gap-to-prediction code is 'none'. Candidates the
training catalogue lacks are appended to the item tower with their own features (no id embedding).
The folder is read as training reads (readers/taac.py: a user on several lines is one user, so result.json has one row
per user; non-finite values follow the checkpoint's --non_finite unless given); its indexer.pkl must map
feature values to the codes training used; feature values the checkpoint never saw are 'unknown', action
types it never saw are clicks. A non-finite user or candidate vector stops the run before any file is written.
Unless history is kept (the checkpoint's keep_history, or --keep_history / --no-keep_history), the creatives of a
user's own sequence are removed from their top-k, which is still k long where enough candidates remain.

Writes result.json ({"time", "top10s": [[creative id x 10] per user], "user": [user ids]}, the baseline
eval's shape) and, for users of the baseline's ANN binary, embedding.fbin / id.u64bin (candidates and their
retrieval ids) and query.fbin (users): a uint32 count and dimension, then float32 / uint64 rows.
With truth.json ({user: creative id}, as taac_synthetic.py writes) beside it, also the competition score.
"""
import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import ArgumentParser, UsageError, exits, make_writable_folder, resolve_device  # noqa: E402
from dataset import DataError, history_batch  # noqa: E402
from eval.infer import (  # noqa: E402
    PREDICT_ACTION_HELP,
    asked_action,
    build_index,
    check_finite,
    choose_blas_kernel,
    history_positions,
    load_run,
    search,
)
from eval.metrics import SCORE_HR, SCORE_NDCG, embed_users, metrics_at_k  # noqa: E402
from files import atomic_write, write_json  # noqa: E402
from readers import taac  # noqa: E402
from readers.features import UNKNOWN, Feature, SideInfo, Vectors  # noqa: E402
from readers.semantic_ids import cold_codes, feature_names  # noqa: E402

HNSW = dict(hnsw_m=64, ef_construction=1280, ef_search=640)  # the baseline's faiss_demo parameters


def build_parser():
    p = ArgumentParser(description="Top-10 creatives per user on the competition's evaluation data.",
                       allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by main.py")
    p.add_argument("--weights", default="best.pt", help="checkpoint file inside --ckpt")
    p.add_argument("--eval_data", required=True, help="the competition's evaluation folder (either layout)")
    p.add_argument("--out", help="output directory (default: <run dir>/competition)")
    p.add_argument("--k", type=int, default=10, help="creatives per user")
    p.add_argument("--hnsw", action="store_true", help="HNSW at the baseline's parameters (M 64, efConstruction "
                   "1280, efSearch 640) instead of the exact index")
    p.add_argument("--batch_size", type=int, default=1024, help="users embedded at once")
    p.add_argument("--device", default="auto", help="torch device for the model")
    p.add_argument("--predict_action", type=int, help=PREDICT_ACTION_HELP)
    p.add_argument("--non_finite", choices=("error", "zero"), help="a NaN / infinite vector or value in the "
                   "evaluation folder: an error, or zero (absent) (default: as the checkpoint was trained)")
    p.add_argument("--keep_history", action=argparse.BooleanOptionalAction, help="let the creatives of a user's "
                   "own sequence compete in the ranking; --no-keep_history removes them from the top-k (default: as "
                   "the checkpoint was trained, its config.json's keep_history)")
    return p


# ----------------------------------------------------------------------------- reading

def read_users(folder: str, config: dict, non_finite: Optional[str] = None):
    """The users to predict, as Interactions of the evaluation folder (feature ids as in training; non_finite:
    taac.read_taac's policy, by default the one the checkpoint was trained with)."""
    item_side = config.get("item_side") or {}
    derived = set(feature_names(item_side["semantic_ids"]["levels"])) if item_side.get("semantic_ids") else set()
    item_ids = [f["name"] for f in item_side.get("features", []) if f["name"] not in derived]  # sid*: from vectors
    user_ids = [f["name"] for f in (config.get("user_side") or {}).get("features", [])]
    seq_file = "predict_seq.jsonl" if os.path.isfile(os.path.join(folder, "predict_seq.jsonl")) else "seq.jsonl"
    return taac.read_taac(folder, config.get("mm_emb_id") or (), item_ids or None, user_ids or None, seq_file,
                          non_finite or config.get("non_finite") or "error")


def check_feature_codes(folder: str, data, trained_on: Optional[dict]) -> None:
    """The evaluation folder's feature codes must mean the values they meant in training (indexer.pkl's 'f'
    map); a checkpoint without the digest (older than it) is not checked."""
    expected = (trained_on or {}).get("feature_codes")
    if expected and data.feature_codes != expected:
        raise UsageError(f"--eval_data {os.path.join(folder, 'indexer.pkl')}: its feature-value map differs from the "
                         f"one the checkpoint was trained with (its feature codes would mean other values)")


def known_codes(values, vocab_size: int) -> np.ndarray:
    """Feature codes the checkpoint's tables lack (a value unseen in training, a negative one) -> unknown."""
    values = np.asarray(values, np.int64)
    return np.where((values < 0) | (values >= vocab_size), UNKNOWN, values)


def fit_to_checkpoint(data, model) -> None:
    """Every code read at inference within the checkpoint's tables: user feature values unseen in training
    become unknown (at the training widths), action types it never saw become clicks (1, as a missing one)."""
    spec = (model.config.user_side or {}).get("features", [])
    if data.user_side is not None and spec:
        features = []
        for f, s in zip(data.user_side.features, spec, strict=True):
            codes = known_codes(f.values, s["vocab_size"])[:, :s["width"]]
            features.append(Feature(f.name, np.pad(codes, ((0, 0), (0, s["width"] - codes.shape[1]))), s["vocab_size"]))
        data.user_side = SideInfo(features)
    actions = model.config.num_actions
    if data.actions is not None and actions:
        data.actions = np.where((data.actions < 0) | (data.actions >= actions), min(1, actions - 1), data.actions)


def read_candidates(folder: str) -> tuple:
    """(creative ids, retrieval ids, {feature id: [value per candidate]}) of predict_set.jsonl or candidate/."""
    path = os.path.join(folder, "predict_set.jsonl")
    if os.path.isfile(path):
        def parse(row):
            features = row.get("features") or {}
            if not isinstance(features, dict):
                raise TypeError(f"features is a {type(features).__name__}, not an object")
            return (id_in(row["creative_id"], "creative_id", INT64), id_in(row["retrieval_id"], "retrieval_id", UINT64),
                    features)
        read = [parsed for _, parsed in taac.json_lines(path, '{"creative_id", "retrieval_id", "features"}', parse)]
        if not read:
            raise DataError(f"{path}: no candidates")
        creatives, retrievals, rows = zip(*read, strict=True)
        return np.array(creatives, np.int64), np.array(retrievals, np.uint64), taac.dict_columns(list(rows))
    path = os.path.join(folder, "candidate")
    if not os.path.isdir(path):
        raise DataError(f"{folder}: no predict_set.jsonl or candidate/ (the candidate set to retrieve from)")
    table = taac.parquet_dataset(path).to_table()
    missing = [c for c in ("creative_id", "retrieval_id") if c not in table.column_names]
    if missing or table.num_rows == 0:
        raise DataError(f"{path}: " + (f"no column {missing[0]!r} (found {table.column_names})" if missing
                                       else "no candidates"))
    columns = {}
    for name in table.column_names:
        if name in ("creative_id", "reid_creative_id", "retrieval_id"):
            continue
        columns[name] = [candidate_value(c) for c in table.column(name).to_pylist()]
    return (table.column("creative_id").to_numpy(), table.column("retrieval_id").to_numpy(), columns)


INT64, UINT64 = (-2 ** 63, 2 ** 63 - 1), (0, 2 ** 64 - 1)


def id_in(value, name: str, bounds: tuple) -> int:
    """An integer id that its array (int64 / uint64) can hold; else a ValueError for json_lines' one line."""
    value = int(value)
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} {value} is outside {bounds[0]}..{bounds[1]}")
    return value


def candidate_value(cell):
    """A candidate/ feature cell: the release's {feature_value, is_str} struct or a plain value; integers are
    value re-ids, anything else (a string value, None) is unknown here."""
    if isinstance(cell, dict):
        cell = None if cell.get("is_str") else cell.get("feature_value")
    return cell if isinstance(cell, int) and not isinstance(cell, bool) else None


# ----------------------------------------------------------------------------- items

def item_rows(model, id_map: dict, data, creatives: np.ndarray, candidate_features: dict) -> tuple:
    """Tower rows of the evaluation folder's items and of the candidates: training rows where training knew
    the creative, new rows (appended to the tower) otherwise. Returns (row of each evaluation item re-id
    (0..N_eval), row of each candidate)."""
    train_row = {raw: i + 1 for i, raw in enumerate(id_map["items"])}
    eval_creatives = [str(c) for c in data.item_ids]
    new = {}
    for c in eval_creatives + [str(c) for c in creatives]:
        if c not in train_row and c not in new:
            new[c] = model.item_tower.num_items + 1 + len(new)
    rows = lambda cs: np.array([train_row.get(c) or new[c] for c in cs], np.int64)  # noqa: E731
    eval_rows, cand_rows = np.concatenate([[0], rows(eval_creatives)]), rows([str(c) for c in creatives])
    if new:
        model.item_tower.extend(new_item_side(model, data, new, eval_creatives, creatives, candidate_features))
        untrained = model.item_tower.id_emb is not None and not model.config.item_id_dropout
        print(f"{len(new)} creatives unknown to training: embedded from their features alone"
              + ("; a model trained long with item ids and no --item_id_dropout can rank them too high "
                 "(docs/results.md)" if untrained else ""))
    return eval_rows, cand_rows


def new_item_side(model, data, new, eval_creatives, creatives, candidate_features):
    """SideInfo of the new rows, in the tower's feature / vector order: values from the evaluation folder's
    item features, else from the candidate records; multimodal vectors from the evaluation folder; semantic-id
    codes (--semantic_ids) assigned from those vectors (none for a creative without one)."""
    spec = model.config.item_side
    eval_pos = {c: i + 1 for i, c in enumerate(eval_creatives)}
    cand_pos = {str(c): i for i, c in enumerate(creatives)}
    order = sorted(new, key=new.get)
    features = []
    for f in spec["features"]:
        given = next((x for x in data.item_side.features if x.name == f["name"]), None)
        values = np.full((len(order), f["width"]), 0, np.int64)
        values[:, 0] = UNKNOWN
        for r, c in enumerate(order):
            if given is not None and c in eval_pos:
                row = np.asarray(given.values[eval_pos[c]])[:f["width"]]
                values[r, :len(row)] = row
            elif c in cand_pos and candidate_features.get(f["name"]):
                v = candidate_features[f["name"]][cand_pos[c]]
                values[r, 0] = int(v) + 1 if isinstance(v, (int, np.integer)) else UNKNOWN
        features.append(Feature(f["name"], known_codes(values, f["vocab_size"]), f["vocab_size"]))
    vectors = []
    for v in spec["vectors"]:
        given = next((x for x in data.item_side.vectors if x.name == v["name"]), None)
        rows = np.zeros((len(order), v["dim"]), np.float16)
        present = np.zeros(len(order), bool)
        for r, c in enumerate(order):
            if given is not None and c in eval_pos:
                rows[r], present[r] = given.vectors[eval_pos[c]], given.present[eval_pos[c]]
        vectors.append(Vectors(v["name"], rows, present))
    if spec.get("semantic_ids"):  # codes from their vectors by the checkpoint's codebooks, as training's were
        coded = {f.name: f for f in cold_codes(spec, model.item_tower.semantic_codebooks.cpu().numpy(), vectors)}
        features = [coded.get(f.name, f) for f in features]
    return SideInfo(features, vectors)


# ----------------------------------------------------------------------------- embedding, search, files

def whole_histories(data, predict_action=1):
    """eval.metrics' histories(rows, lengths, width): each user's Batch after their whole sequence (the most
    recent event included; the prediction time unknown, so no event's gap-to-prediction code is known), the
    last position asked for `predict_action` (models with --next_action)."""
    ends = data.offsets[1:]
    return lambda rows, lengths, width: history_batch(data, rows, ends[rows], lengths, width, known_end=ends[rows],
                                                      predict_action=predict_action)


def seen_candidates(data, cand_rows: np.ndarray) -> list:
    """Per user, the candidate positions (index rows) of the creatives in their evaluation-folder sequence, for
    eval.infer.search's `exclude`: data.items and cand_rows are tower rows (item_rows maps both by creative id);
    sequence creatives that are not candidates are left out."""
    num_rows = int(max(cand_rows.max(initial=0), data.items.max(initial=0)))
    return history_positions(data.items, data.offsets[1:], data.lengths, cand_rows, num_rows)


def write_bin(path: str, array: np.ndarray) -> None:
    """The baseline's ANN files: uint32 rows, uint32 columns, then the rows (float32 or uint64)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.array(array.shape if array.ndim == 2 else (len(array), 1), np.uint32).tofile(f)
            np.ascontiguousarray(array).tofile(f)
    atomic_write(path, write)


def read_bin(path: str, dtype) -> np.ndarray:
    """(rows, columns) array of an .fbin / .u64bin file."""
    with open(path, "rb") as f:
        rows, cols = np.fromfile(f, np.uint32, 2)
        return np.fromfile(f, dtype, int(rows) * int(cols)).reshape(int(rows), int(cols))


def competition_score(top: list, users: list, truth: dict) -> dict:
    """0.31 HR@10 + 0.69 NDCG@10 of the top lists against truth {user: creative id} (users without one skipped)."""
    known = [(row, truth[u]) for row, u in zip(top, users, strict=True) if u in truth]
    ranks = [list(row).index(t) if t in row else len(row) for row, t in known]
    m = metrics_at_k(np.array(ranks), len(top[0]))
    return {"users": len(known), "HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"],
            "score": SCORE_HR * m["HR@10"] + SCORE_NDCG * m["NDCG@10"]}


@exits
def main(argv: Optional[list] = None) -> None:
    """eval/competition.py's command line (see the module docstring); errors exit with one line (cli.exits)."""
    choose_blas_kernel()
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    config, id_map, model, trained_on = load_run(args)
    ask = asked_action(config, args)
    device = resolve_device(args.device)
    normalize = config.get("similarity") == "cosine"
    try:
        data = read_users(args.eval_data, config, args.non_finite)
        creatives, retrievals, candidate_features = read_candidates(args.eval_data)
    except DataError as e:
        raise UsageError(str(e)) from None
    check_feature_codes(args.eval_data, data, trained_on)
    fit_to_checkpoint(data, model)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "competition")
    make_writable_folder(out, "--out")
    eval_rows, cand_rows = item_rows(model, id_map, data, creatives, candidate_features)
    data.items = eval_rows[data.items]  # evaluation re-ids -> tower rows
    model.to(device)
    user_vecs = embed_users(model, whole_histories(data, ask), data.lengths, device, normalize, args.batch_size)
    with torch.no_grad():
        item_vecs = model.item_embeddings(torch.from_numpy(cand_rows).to(device), normalize).float().cpu().numpy()
    check_finite(user_vecs, data.user_ids, "user")
    check_finite(item_vecs, creatives, "creative")
    index = build_index(item_vecs, "hnsw" if args.hnsw else "flat", "auto", **(HNSW if args.hnsw else {}))
    # as trained unless given; a config.json without the key was trained with EvalConfig's default (filter)
    keep_history = config.get("keep_history", False) if args.keep_history is None else args.keep_history
    exclude = None if keep_history else seen_candidates(data, cand_rows)
    top, _ = search(index, user_vecs, min(args.k, len(creatives)), exclude)
    top10s = [[int(creatives[i]) for i in row if i >= 0] for row in top]
    users = [str(u) for u in data.user_ids]
    write_bin(os.path.join(out, "embedding.fbin"), item_vecs.astype(np.float32))
    write_bin(os.path.join(out, "id.u64bin"), retrievals.astype(np.uint64))
    write_bin(os.path.join(out, "query.fbin"), user_vecs.astype(np.float32))
    result = {"time": time.perf_counter() - start, "top10s": top10s, "user": users}
    write_json(os.path.join(out, "result.json"), result)
    print(f"top-{args.k} for {len(users)} users over {len(creatives)} candidates "
          f"({'history kept' if keep_history else 'history filtered'}) written to {out}/result.json "
          f"({result['time']:.1f} s)")
    truth_path = os.path.join(args.eval_data, "truth.json")
    if os.path.isfile(truth_path):
        with open(truth_path) as f:
            truth = {str(k): int(v) for k, v in json.load(f).items()}
        scored = competition_score(top10s, users, truth)
        write_json(os.path.join(out, "score.json"), scored)
        print("against truth.json: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in scored.items()))


if __name__ == "__main__":
    main()
