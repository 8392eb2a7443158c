"""Synthetic logs in the TAAC 2025 competition layouts, any size, with planted signal in every feature family.

    python taac_synthetic.py --out data/taac --layout jsonl --users 20000 --items 8000
    python taac_synthetic.py --out data/taac_pq --layout parquet --users 1000000 --items 500000 --mm_emb_id 81 82

Writes DIR/train (the training folder) and DIR/eval (users to predict, the candidate set, and
truth.json: each predicted user's hidden next click, so a run can be scored end to end).

The planted process (each family is needed to reach the best score):
- items sit in cells (topic x category); the category is item sparse feature 100, the topic is visible only
  through the multimodal vectors (81: topic centroid + noise; 82: a random projection of it + noise);
- a user starts anywhere and clicks inside the cell of their last click or, half the time, anywhere (so the
  history does not give the home cells away), except after a long gap (a new session: the gap to the
  prediction time tells it), when they return to one of their home cells: category = user feature 103,
  topic = one of the values of user array feature 106;
- after a click there may be an exposure (action 0) of a random item, which does not move the user
  (action types tell noise from intent);
- 10% of clicks are conversions (action 2), and a conversion is drawn from one of the user's home cells, never
  from the browsing chain: the next action changes what is clicked (what --next_action can find), and the
  user's features tell where a conversion lands;
- the other competition feature ids carry random values, as uninformative columns do in real logs;
- clicks inside a cell lean to its popular items and may repeat an item the user clicked before (about 6% of
  the predicted clicks are already in the user's sequence): filtering seen creatives loses those hits here.

--cold_items F withholds a random fraction F of the creatives from the training folder: their events are removed
from the training users' sequences (a user left with fewer than 2 events is dropped), and they are absent from
its indexer, item features and vectors. The evaluation folder keeps the whole catalogue (indexer, item features,
vectors, candidates) and the predicted users' events on them, so a predicted click may land on a creative
training never saw (eval/cold.json lists them): what a representation from features and vectors alone
(--semantic_ids) is for.
Nothing else changes: the same process picks the clicks, whether or not their creative is withheld.
"""
import argparse
import json
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np

ITEM_SPARSE = ("100", "101", "102", "112", "114", "115", "116", "117", "118", "119", "120", "121", "122")
USER_SPARSE = ("103", "104", "105", "109")
USER_ARRAY = ("106", "107", "108", "110")
MM_DIMS = {"81": 32, "82": 1024, "83": 3584, "84": 4096, "85": 3584, "86": 3584}
EXPOSURE, CLICK, CONVERSION = 0, 1, 2
CONVERSION_RATE = 0.1  # of clicks; each is drawn from a home cell
NOISE_VOCAB = 20  # values of each uninformative feature
ARRAY_WIDTH = 3   # values per user array feature
LONG_GAP_S = (86_400, 5 * 86_400)  # a new session
SHORT_GAP_S = 300                   # mean gap inside a session
START_TIME = 1_720_000_000
BLOCK_USERS = 100_000


@dataclass
class SyntheticLog:
    """Everything the writers need, in re-id space (users 1..U, items 1..N; feature values 1..K)."""
    user_raw: np.ndarray      # (U,) raw user ids, str
    creative_ids: np.ndarray  # (N,) raw creative id of item i + 1
    offsets: np.ndarray       # (U + 1,) each user's events
    items: np.ndarray         # (E,) item re-id per event
    actions: np.ndarray       # (E,) action type per event
    times: np.ndarray         # (E,) unix seconds per event
    item_features: dict       # feature id -> (N,) value re-ids
    user_sparse: dict         # feature id -> (U,) value re-ids
    user_array: dict          # feature id -> (U, ARRAY_WIDTH) value re-ids
    vectors: dict             # mm id -> (N, dim) float32
    vocab: dict               # feature id -> number of values


def make_items(num_items, topics, categories, mm_ids, rng):
    """Cells, features and multimodal vectors of every item."""
    topic = rng.integers(topics, size=num_items)
    category = rng.integers(categories, size=num_items)
    features = {fid: rng.integers(1, NOISE_VOCAB + 1, size=num_items) for fid in ITEM_SPARSE}
    features["100"] = category + 1
    centroids = rng.standard_normal((topics, 32)).astype(np.float32)
    vectors = {}
    for mm in mm_ids:
        dim = MM_DIMS[mm]
        base = centroids if dim == 32 else centroids @ rng.standard_normal((32, dim)).astype(np.float32) / np.sqrt(32)
        vectors[mm] = np.empty((num_items, dim), np.float32)
        for s in range(0, num_items, 65536):  # bounded temporaries at 500k x 1024
            e = min(s + 65536, num_items)
            vectors[mm][s:e] = base[topic[s:e]] + 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
    return topic, category, features, vectors


class Cells:
    """Items grouped by cell, drawn with a popularity skew inside each cell."""

    def __init__(self, topic, category, categories):
        self.cell_of = topic * categories + category
        self.order = np.argsort(self.cell_of, kind="stable")
        counts = np.bincount(self.cell_of, minlength=(topic.max() + 1) * categories)
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.count = counts

    def draw(self, cells, rng):
        """One item (0-based) per requested cell; an empty cell gives a random item."""
        count = self.count[cells]
        rank = np.floor(count * rng.random(len(cells)) ** 2).astype(np.int64)  # skewed to the cell's first items
        picked = self.order[np.minimum(self.start[cells] + rank, len(self.order) - 1)]
        return np.where(count > 0, picked, rng.integers(len(self.order), size=len(cells)))


def simulate_users(num_users, num_items, cells, topics, categories, mean_clicks, exposure_rate, long_gap_rate,
                   drift, rng):
    """One block of users: (home topics, home category, events per user, items, actions, times)."""
    home_topics = rng.integers(topics, size=(num_users, ARRAY_WIDTH))
    home_cat = rng.integers(categories, size=num_users)
    clicks = np.clip(rng.geometric(1 / (mean_clicks - 3), size=num_users) + 3, 4, 200)
    # Clicks, position by position, vectorised over the users still active.
    width = int(clicks.max())
    click_items = np.zeros((num_users, width), np.int64)
    long_gap = np.zeros((num_users, width), bool)
    converted = np.zeros((num_users, width), bool)
    current = rng.integers(num_items, size=num_users)
    for k in range(width):
        active = np.flatnonzero(clicks > k)
        new_session = rng.random(len(active)) < (1.0 if k == 0 else long_gap_rate)
        home = home_topics[active, rng.integers(ARRAY_WIDTH, size=len(active))] * categories + home_cat[active]
        target = np.where(new_session & (k > 0), home, cells.cell_of[current[active]])
        # a click anywhere (the ceiling is not 1): often inside a session, so its history does not give the
        # home cells away, rarely at a session's start
        stray = rng.random(len(active)) < np.where(new_session, 0.1, drift)
        target = np.where(stray, rng.integers(topics * categories, size=len(active)), target)
        conversion = rng.random(len(active)) < CONVERSION_RATE  # a purchase goes home, whatever the chain
        target = np.where(conversion, home, target)
        current[active] = cells.draw(target, rng)
        click_items[active, k] = current[active]
        long_gap[active, k] = new_session
        converted[active, k] = conversion
    # Exposures before clicks (never before the last two, the held-out targets), then timestamps.
    exposed = (rng.random((num_users, width)) < exposure_rate) & (np.arange(width) < (clicks - 2)[:, None])
    exposed[:, 0] = False
    per_user = clicks + exposed.sum(1)
    offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    valid = np.arange(width) < clicks[:, None]
    slots = valid.astype(np.int64) + exposed  # events each click position makes (exposure first)
    events = int(offsets[-1])
    gaps = np.where(long_gap, rng.uniform(*LONG_GAP_S, size=long_gap.shape),
                    rng.exponential(SHORT_GAP_S, size=long_gap.shape) + 5).astype(np.int64)
    gaps[:, 0] = rng.integers(0, 30 * 86_400, size=num_users)
    click_times = START_TIME + np.cumsum(np.where(valid, gaps, 0), axis=1)
    ends = np.cumsum(slots, axis=1)  # position after each click position's events, within the user
    click_pos = offsets[:-1, None] + ends - 1
    items = np.empty(events, np.int64)
    actions = np.empty(events, np.int64)
    times = np.empty(events, np.int64)
    u_idx, k_idx = np.nonzero(valid)
    pos = click_pos[u_idx, k_idx]
    items[pos] = click_items[u_idx, k_idx] + 1
    actions[pos] = np.where(converted[u_idx, k_idx], CONVERSION, CLICK)
    times[pos] = click_times[u_idx, k_idx]
    u_idx, k_idx = np.nonzero(exposed)
    pos = click_pos[u_idx, k_idx] - 1
    items[pos] = rng.integers(1, num_items + 1, size=len(pos))
    actions[pos] = EXPOSURE
    times[pos] = click_times[u_idx, k_idx] - gaps[u_idx, k_idx] + rng.integers(1, 5, size=len(pos))  # seconds
    # after the previous click: a session's long gap stays right before its first click
    return home_topics, home_cat, per_user, items, actions, times


def generate(num_users, num_items, seed=0, mm_ids=("81",), topics=24, categories=12, mean_clicks=10,
             exposure_rate=0.4, long_gap_rate=0.3, drift=0.5):
    rng = np.random.default_rng(seed)
    topic, category, item_features, vectors = make_items(num_items, topics, categories, mm_ids, rng)
    cells = Cells(topic, category, categories)
    blocks = [simulate_users(min(BLOCK_USERS, num_users - s), num_items, cells, topics, categories, mean_clicks,
                             exposure_rate, long_gap_rate, drift, rng)
              for s in range(0, num_users, BLOCK_USERS)]  # blocks bound the (users x clicks) temporaries
    parts = zip(*blocks, strict=True)
    home_topics, home_cat, per_user, items, actions, times = (np.concatenate(p) for p in parts)
    offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    user_sparse = {fid: rng.integers(1, NOISE_VOCAB + 1, size=num_users) for fid in USER_SPARSE}
    user_sparse["103"] = home_cat + 1
    user_array = {fid: rng.integers(1, NOISE_VOCAB + 1, size=(num_users, ARRAY_WIDTH)) for fid in USER_ARRAY}
    user_array["106"] = home_topics + 1
    vocab = {fid: NOISE_VOCAB for fid in ITEM_SPARSE + USER_SPARSE + USER_ARRAY}
    vocab.update({"100": categories, "103": categories, "106": max(topics, NOISE_VOCAB)})
    creative_ids = 20_000_000 + rng.choice(10 * num_items, size=num_items, replace=False)
    user_raw = np.char.add("user_", np.char.zfill(np.arange(1, num_users + 1).astype(str), 8))
    return SyntheticLog(user_raw, creative_ids, offsets, items, actions, times, item_features, user_sparse,
                        user_array, vectors, vocab)


def split_predict(log, predict_users):
    """(training log, predict log, truth): the last `predict_users` users are predicted; their final click is
    hidden (truth: raw user id -> creative id)."""
    U = len(log.user_raw)
    cut = U - predict_users

    def users(sel, drop_last):
        lo, hi = log.offsets[sel.start], log.offsets[sel.stop]
        lengths = np.diff(log.offsets[sel.start:sel.stop + 1]) - drop_last
        keep = np.ones(hi - lo, bool)
        if drop_last:
            keep[np.cumsum(lengths + 1) - 1] = False
        take = lambda a: a[lo:hi][keep]  # noqa: E731
        return SyntheticLog(log.user_raw[sel], log.creative_ids, np.concatenate([[0], np.cumsum(lengths)]),
                            take(log.items), take(log.actions), take(log.times), log.item_features,
                            {k: v[sel] for k, v in log.user_sparse.items()},
                            {k: v[sel] for k, v in log.user_array.items()}, log.vectors, log.vocab)
    train, predict = users(slice(0, cut), 0), users(slice(cut, U), 1)
    last = log.offsets[cut + 1:] - 1
    truth = {str(u): int(log.creative_ids[i - 1]) for u, i in zip(log.user_raw[cut:], log.items[last], strict=True)}
    return train, predict, truth


def withhold_items(log, cold):
    """The log without the (0-based) items `cold`: their events removed, users left with fewer than 2 dropped, the
    other items renumbered 1..N' in their order (creative ids, features and vectors kept with them)."""
    warm = np.setdiff1d(np.arange(len(log.creative_ids)), cold)
    new_id = np.zeros(len(log.creative_ids) + 1, np.int64)
    new_id[warm + 1] = np.arange(1, len(warm) + 1)
    keep = new_id[log.items] > 0
    owner = np.repeat(np.arange(len(log.user_raw)), np.diff(log.offsets))
    per_user = np.bincount(owner[keep], minlength=len(log.user_raw))
    users = per_user >= 2  # a sequence needs an input and a target
    keep &= users[owner]
    return SyntheticLog(log.user_raw[users], log.creative_ids[warm],
                        np.concatenate([[0], np.cumsum(per_user[users])]).astype(np.int64),
                        new_id[log.items[keep]], log.actions[keep], log.times[keep],
                        {k: v[warm] for k, v in log.item_features.items()},
                        {k: v[users] for k, v in log.user_sparse.items()},
                        {k: v[users] for k, v in log.user_array.items()},
                        {k: v[warm] for k, v in log.vectors.items()}, log.vocab)


# ----------------------------------------------------------------------------- writers

def indexer(log, users=None):
    """The competition's indexer.pkl: raw id -> re-id for users, items and every feature's values."""
    users = log.user_raw if users is None else users
    return {"u": {str(u): i + 1 for i, u in enumerate(users)},
            "i": {int(c): i + 1 for i, c in enumerate(log.creative_ids)},
            "f": {fid: {f"{fid}_{v}": v for v in range(1, size + 1)} for fid, size in log.vocab.items()}}


def item_feature_dict(log, i):
    return {fid: int(values[i]) for fid, values in log.item_features.items()}


def user_feature_dict(log, u):
    out = {fid: int(values[u]) for fid, values in log.user_sparse.items()}
    out.update({fid: [int(v) for v in values[u]] for fid, values in log.user_array.items()})
    return out


def write_seq_jsonl(path, log, user_key):
    """One line per user: the profile record, then [user, item, null, item_feat, action, timestamp] records.
    Returns the byte offset of every line (the competition's seq_offsets.pkl)."""
    offsets = []
    item_feats = [json.dumps(item_feature_dict(log, i)) for i in range(len(log.creative_ids))]
    with open(path, "w", encoding="utf-8") as f:
        for u in range(len(log.user_raw)):
            offsets.append(f.tell())
            uid = json.dumps(user_key(u))
            lo, hi = log.offsets[u], log.offsets[u + 1]
            records = [f"[{uid}, null, {json.dumps(user_feature_dict(log, u))}, null, null, {int(log.times[lo])}]"]
            records += [f"[{uid}, {int(i)}, null, {item_feats[i - 1]}, {int(a)}, {int(t)}]"
                        for i, a, t in zip(log.items[lo:hi], log.actions[lo:hi], log.times[lo:hi], strict=True)]
            f.write("[" + ", ".join(records) + "]\n")
    return offsets


def write_jsonl_layout(folder, log, user_offset=0):
    """The competition-era layout: seq.jsonl, seq_offsets.pkl, indexer.pkl, item_feat_dict.json, creative_emb/."""
    os.makedirs(os.path.join(folder, "creative_emb"), exist_ok=True)
    offsets = write_seq_jsonl(os.path.join(folder, "seq.jsonl"), log, lambda u: u + 1 + user_offset)
    with open(os.path.join(folder, "seq_offsets.pkl"), "wb") as f:
        pickle.dump(offsets, f)
    with open(os.path.join(folder, "indexer.pkl"), "wb") as f:
        pickle.dump(indexer(log), f)
    with open(os.path.join(folder, "item_feat_dict.json"), "w", encoding="utf-8") as f:
        json.dump({str(i + 1): item_feature_dict(log, i) for i in range(len(log.creative_ids))}, f)
    write_jsonl_vectors(os.path.join(folder, "creative_emb"), log)


def write_jsonl_vectors(folder, log):
    for mm, vectors in log.vectors.items():
        if mm == "81":  # the competition ships 81 as a pickle of {creative id: vector}
            with open(os.path.join(folder, f"emb_{mm}_{MM_DIMS[mm]}.pkl"), "wb") as f:
                pickle.dump({int(c): v for c, v in zip(log.creative_ids, vectors, strict=True)}, f)
            continue
        sub = os.path.join(folder, f"emb_{mm}_{MM_DIMS[mm]}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "part-00000.json"), "w", encoding="utf-8") as f:
            for c, v in zip(log.creative_ids, vectors, strict=True):
                f.write(json.dumps({"anonymous_cid": int(c), "emb": v.tolist()}) + "\n")  # exact float32 values


def write_jsonl_predict(folder, train, predict):
    """predict_seq.jsonl (raw user ids, the most recent event included), predict_set.jsonl (candidates),
    plus what inference needs: indexer.pkl (training's users), item_feat_dict.json, creative_emb/. The items are
    the predict log's whole catalogue (training's, plus any creative --cold_items withheld from training)."""
    os.makedirs(os.path.join(folder, "creative_emb"), exist_ok=True)
    write_seq_jsonl(os.path.join(folder, "predict_seq.jsonl"), predict, lambda u: str(predict.user_raw[u]))
    with open(os.path.join(folder, "predict_set.jsonl"), "w", encoding="utf-8") as f:
        for i, c in enumerate(predict.creative_ids):
            f.write(json.dumps({"creative_id": int(c), "retrieval_id": i, "features": item_feature_dict(predict, i)})
                    + "\n")
    with open(os.path.join(folder, "indexer.pkl"), "wb") as f:
        pickle.dump(indexer(predict, train.user_raw), f)
    with open(os.path.join(folder, "item_feat_dict.json"), "w", encoding="utf-8") as f:
        json.dump({str(i + 1): item_feature_dict(predict, i) for i in range(len(predict.creative_ids))}, f)
    write_jsonl_vectors(os.path.join(folder, "creative_emb"), predict)


def write_parquet_layout(folder, log, user_offset=0, indexed_users=None):
    """The 2026 release: seq/, item_feat/, user_feat/, mm_emb/emb_{id}_{dim}_parquet/ (parquet), indexer.pkl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(name, columns):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        pq.write_table(pa.table(columns), os.path.join(folder, name, "part-00000.parquet"))

    events = pa.StructArray.from_arrays([pa.array(log.items), pa.array(log.actions), pa.array(log.times)],
                                        names=["item_id", "action_type", "timestamp"])
    users = np.arange(1, len(log.user_raw) + 1) + user_offset
    table("seq", {"user_id": pa.array(users), "seq": pa.ListArray.from_arrays(pa.array(log.offsets), events)})
    table("item_feat", {"item_id": pa.array(np.arange(1, len(log.creative_ids) + 1)),
                        **{fid: pa.array(v) for fid, v in log.item_features.items()}})
    arrays = {fid: pa.ListArray.from_arrays(pa.array(np.arange(0, v.size + 1, v.shape[1])), pa.array(v.ravel()))
              for fid, v in log.user_array.items()}
    table("user_feat", {"user_id": pa.array(users), **{fid: pa.array(v) for fid, v in log.user_sparse.items()},
                        **arrays})
    for mm, vectors in log.vectors.items():
        sub = os.path.join(folder, "mm_emb", f"emb_{mm}_{MM_DIMS[mm]}_parquet")
        os.makedirs(sub, exist_ok=True)
        dim = vectors.shape[1]
        with pq.ParquetWriter(os.path.join(sub, "part-00000.parquet"),
                              pa.schema([("anonymous_cid", pa.int64()), ("emb", pa.list_(pa.float32()))])) as w:
            for s in range(0, len(vectors), 65536):  # bounded memory at 500k x 1024
                block = vectors[s:s + 65536]
                emb = pa.ListArray.from_arrays(pa.array(np.arange(0, block.size + 1, dim)), pa.array(block.ravel()))
                w.write_table(pa.table({"anonymous_cid": pa.array(log.creative_ids[s:s + 65536]), "emb": emb}))
    with open(os.path.join(folder, "indexer.pkl"), "wb") as f:
        pickle.dump(indexer(log, indexed_users), f)


def write_parquet_predict(folder, train, predict):
    """The 2026 release's evaluation folder: the predicted users in the training layout, and candidate/ (the
    predict log's whole catalogue, as in write_jsonl_predict)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    write_parquet_layout(folder, predict, user_offset=len(train.user_raw),
                         indexed_users=np.concatenate([train.user_raw, predict.user_raw]))
    os.makedirs(os.path.join(folder, "candidate"), exist_ok=True)
    feats = {fid: pa.StructArray.from_arrays([pa.array(v.astype(np.int64)), pa.array(np.zeros(len(v), np.int64))],
                                             names=["feature_value", "is_str"])
             for fid, v in predict.item_features.items()}
    n = len(predict.creative_ids)
    pq.write_table(pa.table({"creative_id": pa.array(predict.creative_ids),
                             "reid_creative_id": pa.array(np.arange(1, n + 1)),
                             "retrieval_id": pa.array(np.arange(n)), **feats}),
                   os.path.join(folder, "candidate", "part-00000.parquet"))


def write(out, layout, num_users, num_items, seed=0, mm_ids=("81",), predict_users=None, cold_items=0.0, **process):
    """DIR/train and DIR/eval in `layout` ('jsonl' or 'parquet'); cold_items: the fraction of creatives withheld
    from training (listed in DIR/eval/cold.json). Returns the truth dict."""
    predict_users = max(1, num_users // 10) if predict_users is None else predict_users
    log = generate(num_users + predict_users, num_items, seed, mm_ids, **process)
    train, predict, truth = split_predict(log, predict_users)
    cold = np.sort(np.random.default_rng([seed, 1]).choice(num_items, round(cold_items * num_items), replace=False))
    if len(cold):
        train = withhold_items(train, cold)
    train_dir, eval_dir = os.path.join(out, "train"), os.path.join(out, "eval")
    os.makedirs(train_dir, exist_ok=True)
    os.makedirs(eval_dir, exist_ok=True)
    if layout == "jsonl":
        write_jsonl_layout(train_dir, train)
        write_jsonl_predict(eval_dir, train, predict)
    else:
        write_parquet_layout(train_dir, train)
        write_parquet_predict(eval_dir, train, predict)
    with open(os.path.join(eval_dir, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f)
    if len(cold):
        with open(os.path.join(eval_dir, "cold.json"), "w", encoding="utf-8") as f:
            json.dump([int(c) for c in log.creative_ids[cold]], f)
    return truth


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write (train/ and eval/ inside)")
    p.add_argument("--layout", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--users", type=int, default=20000, help="training users (10%% more are written to predict)")
    p.add_argument("--items", type=int, default=8000)
    p.add_argument("--predict_users", type=int, default=None, help="users to predict (default: users / 10)")
    p.add_argument("--mean_clicks", type=int, default=10, help="mean clicks per user (exposures come on top)")
    p.add_argument("--mm_emb_id", nargs="+", default=["81"], choices=sorted(MM_DIMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold_items", type=float, default=0.0, help="fraction of creatives withheld from training "
                   "(the evaluation folder has them; eval/cold.json lists them)")
    a = p.parse_args(argv)
    if a.users < 1 or a.items < 2:
        p.error("--users must be >= 1 and --items >= 2")
    if not 0 <= a.cold_items < 1:
        p.error(f"--cold_items must be in [0, 1), got {a.cold_items}")
    truth = write(a.out, a.layout, a.users, a.items, a.seed, tuple(a.mm_emb_id), a.predict_users,
                  cold_items=a.cold_items, mean_clicks=a.mean_clicks)
    print(f"wrote {a.out}/train and {a.out}/eval ({a.layout}): {a.users} users, {a.items} items, "
          f"{len(truth)} users to predict", file=sys.stderr)


if __name__ == "__main__":
    main()
