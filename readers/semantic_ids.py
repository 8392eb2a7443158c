"""Semantic ids (--semantic_ids L K): each item's multimodal vector quantised by residual k-means (RQ-KMeans, as
the top TAAC 2025 teams built them) into L codes, one per level, each one of K centroids of what the levels
before left unexplained. The codes are L more item features of the tower (features.Feature "sid0", "sid1", ...,
vocab_size K + 1, width 1): items that share a centroid share its embedding, so a creative training never saw
still gets learned parts from its vector alone (eval/competition.py assigns its codes with `assign`).

Codes: 0 = the item has no vector (the padding code: that feature adds nothing), 1..K = centroids.
The vector families (--mm_emb_id / --item_emb) are each L2-normalised and concatenated (`quantiser_input`).
The codebooks (L, K, d) live in the item tower (buffer `semantic_codebooks`, so a checkpoint carries them);
codes and codebooks are cached under --cache_dir, keyed by the data, the families, L, K and the seed.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from readers.cache import file_digest, read_cache, write_cache
from readers.features import Feature, SideInfo

NONE = 0  # the code of an item without a vector (the feature's padding row: a zero embedding)
SEMANTIC_VERSION = 1  # bump when the quantiser's arithmetic changes: cached codes of an older one are not served
CHUNK = 8192          # rows per block of the nearest-centroid search: the same blocks wherever codes are computed
NITER = 20            # k-means iterations per level
MAX_POINTS_PER_CENTROID = 256  # faiss's default sample: k-means trains on at most K x 256 items per level


@dataclass
class SemanticIds:
    """The quantiser of a catalogue: which vector families (Vectors names, in order) and the codebooks."""
    vectors: list          # names of the quantised vector families, in concatenation order
    codebooks: np.ndarray  # (L, K, d) float32 centroids, level by level

    def spec(self) -> dict:
        """Shapes that rebuild the tower's codebook buffer (part of SideInfo.spec())."""
        levels, k, dim = self.codebooks.shape
        return {"levels": int(levels), "k": int(k), "dim": int(dim), "vectors": list(self.vectors)}


def feature_names(levels: int) -> list:
    """The item features holding the codes: 'sid0', 'sid1', ... (appended after the data's own features)."""
    return [f"sid{level}" for level in range(levels)]


def quantiser_input(families: list) -> tuple:
    """(N, sum of dims) float32 rows of the families (features.Vectors), each family L2-normalised so that no
    family outweighs another by its scale or width, and (N,) whether the item has any of them."""
    present = np.zeros(len(families[0].present), bool)
    parts = []
    for v in families:
        rows = np.asarray(v.vectors, np.float32)
        norms = np.sqrt(np.square(rows, dtype=np.float64).sum(1, keepdims=True))  # float64: row by row, exact
        parts.append((rows / np.maximum(norms, 1e-12)).astype(np.float32) * np.asarray(v.present)[:, None])
        present |= np.asarray(v.present, bool)
    return np.concatenate(parts, 1), present


def _nearest(residual: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (squared L2), in float64 blocks of CHUNK rows. Why float64: the
    rounding of a matrix product depends a little on the block's shape, so a cold item assigned alone and the
    same vector inside the catalogue could otherwise split a near-tie differently."""
    c = centroids.astype(np.float64)
    c_norms = np.square(c).sum(1)
    out = np.empty(len(residual), np.int64)
    for s in range(0, len(residual), CHUNK):
        block = residual[s:s + CHUNK]
        out[s:s + CHUNK] = np.argmin(c_norms[None] - 2 * block @ c.T, axis=1)  # |x|^2 is the same for every c
    return out


def _descend(residual: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """One level: the nearest centroid of each residual row; the rows become what that centroid leaves."""
    idx = _nearest(residual, centroids)
    residual -= centroids[idx].astype(np.float64)
    return idx


def assign(vectors: np.ndarray, codebooks: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """(N, L) codes of `vectors` (N, d) under `codebooks` (L, K, d): greedily, level by level, the nearest
    centroid of what the levels before left (1..K), NONE (0) for rows not `present`. The one way codes are
    computed: training's catalogue (residual_kmeans) and cold items at inference alike."""
    vectors = np.asarray(vectors)
    present = np.ones(len(vectors), bool) if present is None else np.asarray(present, bool)
    rows = np.flatnonzero(present)
    codes = np.full((len(vectors), len(codebooks)), NONE, np.int64)
    for s in range(0, len(rows), CHUNK):  # blocks bound the float64 residual of a large catalogue
        take = rows[s:s + CHUNK]
        residual = np.asarray(vectors[take], np.float64)
        for level, centroids in enumerate(codebooks):
            codes[take, level] = _descend(residual, centroids) + 1
    return codes


def residual_kmeans(vectors: np.ndarray, present: np.ndarray, levels: int, k: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """RQ-KMeans: (codebooks (L, K, d) float32, codes (N, L) int64) of `vectors` (N, d), rows not `present`
    left out (code NONE). Level l runs faiss k-means (NITER iterations, seed + l) on the residuals the levels
    before leave, over a seeded sample of at most K x MAX_POINTS_PER_CENTROID items; the same seed gives the
    same result. Raises ValueError when fewer than K items have a vector."""
    import faiss  # here: only a run with --semantic_ids loads it
    present = np.asarray(present, bool)
    rows = np.flatnonzero(present)
    if len(rows) < k:
        raise ValueError(f"only {len(rows)} items have a vector, fewer than the K = {k} centroids of a level")
    sample = rows
    if len(rows) > k * MAX_POINTS_PER_CENTROID:  # sampled here, not by faiss: the residuals of the rest are not held
        sample = np.sort(np.random.default_rng(seed).choice(rows, k * MAX_POINTS_PER_CENTROID, replace=False))
    dim = vectors.shape[1]
    residual = np.asarray(vectors[sample], np.float64)
    codebooks = np.zeros((levels, k, dim), np.float32)
    for level in range(levels):
        kmeans = faiss.Kmeans(dim, k, niter=NITER, seed=seed + level, verbose=False, min_points_per_centroid=1,
                              max_points_per_centroid=MAX_POINTS_PER_CENTROID)
        kmeans.train(np.ascontiguousarray(residual, np.float32))
        codebooks[level] = kmeans.centroids
        _descend(residual, codebooks[level])
    return codebooks, assign(vectors, codebooks, present)


def cache_key(fingerprint: str, families: list, levels: int, k: int, seed: int, sources: list) -> str:
    """What the codes depend on, as one string: the data's fingerprint, the families' names and the digests
    of the files they came from (`sources`: --item_emb files, which a log's fingerprint does not cover)."""
    digests = [file_digest(p) for p in sources]
    return json.dumps([SEMANTIC_VERSION, fingerprint, [v.name for v in families], digests, levels, k, seed])


def with_semantic_ids(side: SideInfo, families: list, levels: int, k: int, seed: int, cache_dir: str | None = None,
                      key: str | None = None) -> SideInfo:
    """`side` with the L code features appended and its quantiser (SideInfo.semantic) set: codes and codebooks
    from the cache under `cache_dir` when `key` (cache_key) was computed before, else residual_kmeans (then
    cached). Raises ValueError (residual_kmeans') when too few items have a vector."""
    folder = None
    if cache_dir and key:
        folder = os.path.join(cache_dir, f"semantic-ids-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    found = read_cache(folder) if folder and os.path.isdir(folder) else None
    dim = sum(v.vectors.shape[1] for v in families)
    shapes = ((levels, k, dim), (len(families[0].present), levels))
    if found is not None and (found[0].get("codebooks") is None or found[0].get("codes") is None
                              or (found[0]["codebooks"].shape, found[0]["codes"].shape) != shapes):
        found = None  # another quantiser under the same name (a hash collision): computed again
    if found is not None:
        codebooks, codes = np.array(found[0]["codebooks"]), np.array(found[0]["codes"])
    else:
        matrix, present = quantiser_input(families)
        codebooks, codes = residual_kmeans(matrix, present, levels, k, seed)
        if folder:
            write_cache(folder, {"codebooks": codebooks, "codes": codes},
                        {"levels": levels, "k": k, "vectors": [v.name for v in families]})
    features = [Feature(name, codes[:, level:level + 1], k + 1) for level, name in enumerate(feature_names(levels))]
    return SideInfo(list(side.features) + features, list(side.vectors),
                    SemanticIds([v.name for v in families], codebooks))


def cold_codes(spec: dict, codebooks: np.ndarray, vectors: list) -> list:
    """The code features of items training never saw, from their vectors: `spec` the tower's item_side spec,
    `vectors` the new rows' Vectors in the spec's order. Returns [Feature per level], as with_semantic_ids."""
    semantic = spec["semantic_ids"]
    by_name = {v.name: v for v in vectors}
    matrix, present = quantiser_input([by_name[name] for name in semantic["vectors"]])
    codes = assign(matrix, codebooks, present)
    return [Feature(name, codes[:, level:level + 1], semantic["k"] + 1)
            for level, name in enumerate(feature_names(semantic["levels"]))]

