"""The circuit store: an output folder that per-sample results are written into as they are
computed, so a killed run resumes where it stopped and a finished one is never recomputed.

Layout of a folder (format version :data:`FORMAT_VERSION`)::

    manifest.json                 format version, the settings that matter, their hash, the graph
    edges.txt                     one EAP-IG edge name per line: column e of every score tensor
    shards/scores-<key>.safetensors   edge_scores (B, E) float32 and circuits (B, E) bool of one batch
    shards/rows-<key>.parquet         one row per sample of that batch (id, faithfulness, ...)
    samples.parquet, samples.csv  the per-sample table of the whole run, written at the end
    ids.json                      the samples the folder holds: those its last run asked for

A folder holds the samples its last run asked for (``ids.json``, written when the run starts):
readers (`cud anchors`, `cud score`, `cud validate`) see those, in that order. Circuits of
other samples computed into the folder by an earlier run stay in ``shards/`` and are reused if
asked for again, but are never read back with the folder's samples.

A shard is committed when its rows file exists: the tensor file is written first, the rows file
last, each to a temporary name and renamed (atomic on POSIX; a failed write removes its
temporary file). A shard's key is a hash of its list of sample ids (unambiguous for any ids),
so recomputing the same batch (after a crash, or by another worker) overwrites it rather than
duplicating it. A sample whose question or answer changed since it was stored counts as not
done. Opening a folder written with other settings, or by another format version, raises
:class:`StoreError` instead of mixing results; the check and the writing of the manifest hold a
lock on the folder, so two runs started at once into one folder cannot both claim it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.data.samples import QASample
from cud.errors import StoreError
from cud.folders import folder_lock, replacing, write_bytes
from cud.tables import save_table

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
EDGES = "edges.txt"
SHARDS = "shards"
TABLE = "samples"
IDS = "ids.json"


def settings_hash(settings: dict) -> str:
    """A short stable hash of a JSON-able settings dict."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def text_hash(sample: QASample) -> str:
    """A stored row's sample check: its question and answer (and a text's split settings)."""
    text = f"{sample.question}\x1f{sample.answer}"
    if "text_settings" in sample.extra:
        text += f"\x1f{sample.identity()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        write_bytes(path, data, sync=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot write {path.name} ({e.strerror or e})") from None


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _ensure_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    try:
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{root}: cannot create the output folder ({e.strerror})") from None


def stored_settings(root: str | Path) -> dict:
    """The settings a circuits folder was made with (empty: no folder yet)."""
    manifest = _read_manifest(Path(root))
    settings = manifest.get("settings") if manifest else None
    return settings if isinstance(settings, dict) else {}


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable manifest ({e}); use another --out folder") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "cud-circuits":
        raise StoreError(f"{path}: not a cud circuits folder")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{root}: written by an incompatible cud (store format {version}, this "
                         f"cud reads format {FORMAT_VERSION}); use another --out folder")
    return manifest


class CircuitStore:
    """Writer side of a circuits folder. Use :meth:`open`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.graph = Graph(**manifest["graph"])

    @classmethod
    def open(cls, root: str | Path, settings: dict, graph: Graph) -> "CircuitStore":
        """Open ``root`` for writing results of ``settings`` on ``graph``: create it, or resume it
        when it holds results of the same settings; refuse it otherwise."""
        root = Path(root)
        _ensure_folder(root)
        with folder_lock(root, wait=True):  # a short wait: workers share the folder
            return cls._open_locked(root, settings, graph)

    @staticmethod
    def check(root: str | Path, settings: dict, graph: Graph) -> dict | None:
        """The manifest of ``root`` when it holds results of ``settings`` on ``graph`` (None
        when it holds none); refuses other settings or another graph. Writes nothing."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root}: output path exists and is not a folder")
        manifest = _read_manifest(root)
        if manifest is None:
            return None
        if manifest.get("settings_hash") != settings_hash(settings):
            old = manifest.get("settings", {})
            changed = sorted(k for k in set(old) | set(settings)
                             if old.get(k) != settings.get(k))
            raise StoreError(f"{root}: holds results computed with other settings (differs "
                             f"in: {', '.join(changed) or 'unknown'}); use another --out "
                             f"folder so old and new results do not mix")
        if manifest.get("graph") != graph.cfg:
            raise StoreError(f"{root}: holds circuits of another graph "
                             f"({manifest.get('graph')})")
        return manifest

    @classmethod
    def _open_locked(cls, root: Path, settings: dict, graph: Graph) -> "CircuitStore":
        digest = settings_hash(settings)
        manifest = cls.check(root, settings, graph)
        if manifest is not None:
            return cls(root, manifest)
        manifest = {"kind": "cud-circuits", "format_version": FORMAT_VERSION,
                    "settings_hash": digest, "settings": settings, "graph": graph.cfg,
                    "n_edges": graph.n_edges}
        _atomic_write_text(root / EDGES, "\n".join(graph.edge_names) + "\n")
        _atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        return cls(root, manifest)

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def rows(self) -> pd.DataFrame:
        """Every committed row (the last one per sample id wins)."""
        return _read_rows(self.root)

    def hold(self, ids: Sequence[str]) -> None:
        """Record ``ids`` as the samples the folder holds (``ids.json``): the samples of the
        run now writing it, in order. Circuits of other samples, from earlier runs, stay in
        ``shards/`` (a later run asking for them again reuses them) but are not read back."""
        _atomic_write_text(self.root / IDS, json.dumps({"ids": list(ids)}, indent=0) + "\n")

    def done(self, text_hashes: dict[str, str]) -> set[str]:
        """Ids whose stored row matches the given ``{id: text_hash}`` (same question and answer)."""
        rows = self.rows()
        if rows.empty:
            return set()
        return {i for i, h in zip(rows["id"], rows["text_hash"]) if text_hashes.get(i) == h}

    def write_batch(self, ids: Sequence[str], edge_scores: Tensor, circuits: Tensor,
                    rows: Sequence[dict]) -> str:
        """Commit one batch: tensors first, then its rows (the commit marker). Returns its key."""
        from safetensors.torch import save

        ids = list(ids)
        if not (len(ids) == edge_scores.shape[0] == circuits.shape[0] == len(rows)):
            raise ValueError("ids, scores, circuits and rows disagree on the batch size")
        key = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        shards = self.root / SHARDS
        blob = save({"edge_scores": edge_scores.detach().float().cpu().contiguous(),
                     "circuits": circuits.detach().bool().cpu().contiguous()},
                    metadata={"ids": json.dumps(ids)})
        _atomic_write_bytes(shards / f"scores-{key}.safetensors", blob)
        table = pd.DataFrame([{"id": i, **r, "shard": key, "row": k}
                              for k, (i, r) in enumerate(zip(ids, rows))])
        try:
            with replacing(shards / f"rows-{key}.parquet") as tmp:
                table.to_parquet(tmp, index=False)
        except OSError as e:
            raise StoreError(f"{shards}: cannot write the rows of a batch ({e.strerror or e})"
                             ) from None
        return key

    def finalize(self, order: Iterable[str] | None = None) -> pd.DataFrame:
        """Write ``samples.parquet`` and ``samples.csv`` (in ``order`` when given, restricted to
        those ids) and return that table."""
        rows = self.rows()
        if order is not None:
            order = list(order)
            rows = rows.set_index("id").reindex(order).dropna(subset=["shard"]).reset_index()
        save_table(rows, self.root / TABLE, index=False)
        return rows


def _read_rows(root: Path) -> pd.DataFrame:
    files = sorted((root / SHARDS).glob("rows-*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    if not files:
        return pd.DataFrame(columns=["id", "text_hash", "shard", "row"])
    tables = []
    for f in files:
        try:
            tables.append(pd.read_parquet(f))
        except Exception as e:  # a damaged shard is named, never silently skipped
            raise StoreError(f"{f}: unreadable shard ({type(e).__name__}); delete it to "
                             f"recompute its samples") from None
    rows = pd.concat(tables, ignore_index=True)
    return rows.drop_duplicates("id", keep="last").reset_index(drop=True)


@dataclass
class CircuitSet:
    """Per-sample circuits read back from a folder. Row k of every tensor is sample ``ids[k]``."""

    ids: list[str]
    edge_scores: Tensor   # (N, E) float32
    circuits: Tensor      # (N, E) bool
    graph: Graph
    table: pd.DataFrame   # one row per sample, same order, column "id" first
    settings: dict
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: Iterable[str]) -> "CircuitSet":
        """The samples ``ids``, in that order; an unknown id is a :class:`StoreError`."""
        ids = list(ids)
        where = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise StoreError(f"{self.root or 'circuits'}: no circuit for sample id(s) "
                             f"{', '.join(map(str, missing[:5]))}"
                             f"{' …' if len(missing) > 5 else ''}")
        index = torch.tensor([where[i] for i in ids], dtype=torch.long)
        table = self.table.iloc[index.numpy()].reset_index(drop=True)
        return CircuitSet(ids, self.edge_scores[index], self.circuits[index], self.graph,
                          table, self.settings, self.root)


def held_ids(root: str | Path) -> list[str] | None:
    """The samples a circuits folder holds (``ids.json``: those its last run asked for, in
    order), or None for a folder written before it was kept."""
    path = Path(root) / IDS
    if not path.exists():
        return None
    try:
        ids = json.loads(path.read_text())["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: unreadable ({type(e).__name__}); run `cud circuits` into "
                         f"the folder again to rewrite it") from None
    if not isinstance(ids, list):
        raise StoreError(f"{path}: expected {{\"ids\": [...]}}")
    return [str(i) for i in ids]


def load_circuits(root: str | Path, ids: Iterable[str] | None = None) -> CircuitSet:
    """Read a circuits folder (finished or not): the samples it holds (``ids.json``, the last
    run's samples, in its order; those finished so far), or in a folder written before that
    file was kept every stored sample (in the order of ``samples.parquet``, then of commit);
    ``ids`` picks and orders."""
    from safetensors import safe_open

    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such circuits folder")
    manifest = _read_manifest(root)
    if manifest is None:
        raise StoreError(f"{root}: not a circuits folder (no {MANIFEST}); run `cud circuits` first")
    graph = Graph(**manifest["graph"])
    rows = _read_rows(root)
    held = held_ids(root)
    final = root / f"{TABLE}.parquet"
    if held is not None:  # the samples of the folder's last run, those of them finished
        rows = rows.set_index("id").reindex(held).dropna(subset=["shard"]).reset_index()
    elif final.exists():
        order = pd.read_parquet(final, columns=["id"])["id"].tolist()
        known = set(order)
        rows = pd.concat([rows.set_index("id").reindex(order).dropna(subset=["shard"]),
                          rows[~rows["id"].isin(known)].set_index("id")]).reset_index()
    if rows.empty:
        raise StoreError(f"{root}: holds no finished sample yet")
    scores = torch.empty(len(rows), graph.n_edges, dtype=torch.float32)
    circuits = torch.empty(len(rows), graph.n_edges, dtype=torch.bool)
    for key, group in rows.groupby("shard", sort=False):
        path = root / SHARDS / f"scores-{key}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                s, c = f.get_tensor("edge_scores"), f.get_tensor("circuits")
        except Exception as e:
            raise StoreError(f"{path}: unreadable shard ({type(e).__name__}); delete its rows "
                             f"file to recompute its samples") from None
        if s.shape[1] != graph.n_edges:
            raise StoreError(f"{path}: {s.shape[1]} edges, the manifest says {graph.n_edges}")
        where = torch.tensor(group.index.to_numpy(dtype="int64"))
        within = torch.tensor(group["row"].to_numpy(dtype="int64"))
        scores[where], circuits[where] = s[within], c[within]
    table = rows.drop(columns=["shard", "row"]).reset_index(drop=True)
    out = CircuitSet(table["id"].tolist(), scores, circuits, graph, table,
                     manifest["settings"], root)
    return out if ids is None else out.subset(ids)
