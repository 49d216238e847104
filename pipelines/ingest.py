"""Ray Data ingestion: many datasets -> cache records in Parquet on any fsspec filesystem, committed last.

Plan (per base model): list files on the driver (`list_items`) -> `from_items` -> plan and decide
each clip in CPU tasks (`plan_works`: header + hash, no pixels; the small result comes back so a
re-run with nothing new starts no encoder) -> decode in CPU tasks (`decode_works`, PyAV, only the
clips the VAE needs) streaming into an actor pool (`build_records`: one model per actor,
`num_gpus=1` when the cluster has GPUs) -> a datasink writing records partitioned by dataset into the
run's temporary folder. The driver then commits (IngestStore.commit_run: manifest last).
Orchestration only: decoding, encoding, the record format, fingerprints and skip rules are the
library's (motiondirector/data/).
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor
from ray.exceptions import RayTaskError

from motiondirector.api import (
    CacheRecord,
    ClipWork,
    DataError,
    DataFile,
    DatasetState,
    IngestDataset,
    IngestSpec,
    IngestStore,
    LiveClip,
    Reject,
    RowIndex,
    SourceItem,
    build_records,
    decode_works,
    list_items,
    new_run_id,
    plan_works,
    prune,
    write_records,
)

# Row statuses between stages; the payload column holds the pickled object.
WORK, ENCODED, REUSED, KEPT, REJECTED = "work", "encoded", "reused", "kept", "rejected"


@dataclasses.dataclass
class DatasetSummary:
    """Clips of one dataset in one run. encoded: new latents (VAE ran); reused: new row with committed
    latents (e.g. only the caption changed); kept: already committed; rejected: files not usable."""

    encoded: int = 0
    reused: int = 0
    kept: int = 0
    rejected: int = 0

    @property
    def clips(self) -> int:
        return self.encoded + self.reused + self.kept


@dataclasses.dataclass
class IngestResult:
    output: str
    run_id: str
    commit: str | None  # commit file name; None when nothing changed
    datasets: dict[str, DatasetSummary]
    rejects: list[Reject]
    seconds: float
    pruned_commit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, "run_id": self.run_id, "commit": self.commit,
                "pruned_commit": self.pruned_commit, "seconds": round(self.seconds, 3),
                "datasets": {name: {**dataclasses.asdict(s), "clips": s.clips} for name, s in self.datasets.items()},
                "rejects": [dataclasses.asdict(r) for r in self.rejects]}


def _row(dataset: str, status: str, payload: object) -> dict[str, Any]:
    return {"dataset": dataset, "status": status, "payload": pickle.dumps(payload)}


def _plan(row: dict[str, Any], *, specs: dict[str, IngestDataset], index: RowIndex, vae_id: str,
          text_encoder_id: str) -> list[dict[str, Any]]:
    """CPU task: one source file -> its decided clip works (no pixels), or one reject row."""
    item = SourceItem(path=row["path"], video_index=int(row["video_index"]), caption=row["caption"],
                      kind=row["kind"])
    dataset = row["dataset"]
    try:
        works = plan_works(item, specs[dataset], index, vae_id, text_encoder_id)
    except Exception as error:  # noqa: BLE001 - a bad file becomes a reject row, whatever broke
        return [_row(dataset, REJECTED, Reject.of(error, dataset, item.path, "plan"))]
    return [_row(dataset, WORK, work) for work in works]


def _decode(row: dict[str, Any]) -> list[dict[str, Any]]:
    """CPU task: one file's works to build -> the same works with pixels where the VAE needs them."""
    works: list[ClipWork] = pickle.loads(row["payload"])
    dataset = row["dataset"]
    try:
        works = decode_works(works)
    except Exception as error:  # noqa: BLE001 - e.g. frame data truncated behind an intact header
        return [_row(dataset, REJECTED, Reject.of(error, dataset, works[0].plan.video_path, "decode"))]
    return [_row(dataset, WORK, work) for work in works]


class _Encoder:
    """Actor: loads the base model once, turns batches of works into records; rejects pass through."""

    def __init__(self, base: str, device: str, output: str, batch_size: int, threads: int | None = None) -> None:
        from motiondirector.api import load_backbone

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.backbone = load_backbone(base, device)
        self.fs = IngestStore(output).fs
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = [pickle.loads(payload) for payload in batch["payload"]]
        records = iter(build_records(self.backbone, [e for e in entries if isinstance(e, ClipWork)], self.fs,
                                     self.batch_size))
        out = [_row(dataset, status, entry) if status == REJECTED
               else _row(dataset, REUSED if entry.latent_source else ENCODED, next(records))
               for dataset, status, entry in zip(batch["dataset"], batch["status"], entries, strict=True)]
        return {key: np.array([row[key] for row in out], dtype=object) for key in ("dataset", "status", "payload")}


@dataclasses.dataclass
class _SinkReturn:
    records: list[DataFile]
    counts: Counter  # (dataset, status) -> clips
    live: list[tuple[str, LiveClip]]
    rejects: list[Reject]


class _RunSink(Datasink):
    """Writes each write task's records as one Parquet file per dataset in the run's temporary folder and
    returns the file list (the commit lists exactly these files) with live clips, counts and rejects."""

    def __init__(self, output: str, folder: str) -> None:
        self.output = output
        self.folder = folder
        self.returns: list[_SinkReturn] = []

    def write(self, blocks: Iterable[Any], ctx: Any) -> _SinkReturn:
        records: dict[str, list[CacheRecord]] = defaultdict(list)
        result = _SinkReturn([], Counter(), [], [])
        for block in blocks:
            for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                dataset, status, entry = row["dataset"], row["status"], pickle.loads(row["payload"])
                result.counts[dataset, status] += 1
                if status == REJECTED:
                    result.rejects.append(entry)
                else:
                    records[dataset].append(entry)
                    result.live.append((dataset, LiveClip.of(entry, entry.latent_fingerprint,
                                                             entry.text_fingerprint)))
        store = IngestStore(self.output)
        result.records = [write_records(store, self.folder, name, rows) for name, rows in records.items()]
        return result

    def on_write_complete(self, write_result: Any) -> None:
        self.returns = list(write_result.write_returns)


@ray.remote
def _encoder_ids(base: str, device: str) -> tuple[str, str]:
    """The ids the actors will fingerprint with (they depend on the device's dtype), for the CPU stage."""
    from motiondirector.api import load_backbone

    backbone = load_backbone(base, device)
    return backbone.vae_id, backbone.text_encoder_id


def _gpus_per_encoder(device: str) -> int:
    return 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _list_dataset(dataset: IngestDataset) -> tuple[list[SourceItem], list[Reject]]:
    try:
        return list_items(dataset), []
    except DataError as error:  # a missing folder or caption: the dataset keeps its committed state
        return [], [Reject.of(error, dataset.name, ", ".join(dataset.sources), "list")]


@dataclasses.dataclass
class _GroupResult:
    vae_id: str
    text_encoder_id: str
    files: list[DataFile]
    live: dict[str, list[LiveClip]]
    counts: Counter  # (dataset, status) -> clips
    rejects: list[Reject]


def _run_group(spec: IngestSpec, base: str, datasets: list[IngestDataset], items: list[dict[str, Any]],
               index: RowIndex, folder: str) -> _GroupResult:
    """Ray Data for the datasets sharing `base`: plan all files, then decode and encode what is new."""
    num_gpus = _gpus_per_encoder(spec.device)
    try:
        vae_id, text_encoder_id = ray.get(_encoder_ids.options(
            num_gpus=num_gpus, resources=spec.encoder_resources).remote(base, spec.device))
    except RayTaskError as error:
        raise error.cause from None  # e.g. ModelNotAvailableError: the CLI maps it to its exit code
    result = _GroupResult(vae_id, text_encoder_id, [], defaultdict(list), Counter(), [])
    # Planning reads headers and hashes only; its small output comes back to the driver so a re-run
    # with nothing new never starts the encoders. One file per block keeps all CPUs busy.
    decode_options = {"resources": spec.decode_resources} if spec.decode_resources else {}
    planned = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _plan, **decode_options, fn_kwargs={"specs": {d.name: d for d in datasets}, "index": index.only(d.name for d in datasets),
                          "vae_id": vae_id, "text_encoder_id": text_encoder_id}).take_all()
    builds: dict[tuple[str, str], list[ClipWork]] = defaultdict(list)
    for row in planned:
        entry = pickle.loads(row["payload"])
        if row["status"] == REJECTED:
            result.rejects.append(entry)
        elif entry.action == "keep":
            result.counts[row["dataset"], KEPT] += 1
            result.live[row["dataset"]].append(entry.live)
        else:
            builds[row["dataset"], entry.plan.video_path].append(entry)
    if not builds:
        return result
    # Decode tasks stream into the encoder actors, so decoding overlaps encoding.
    # One block (= one decode task) per `files_per_decode_task` files: fewer, longer tasks when files are small.
    blocks = -(-len(builds) // spec.files_per_decode_task)
    pipeline = ray.data.from_items([{"dataset": dataset, "payload": pickle.dumps(works)}
                                    for (dataset, _), works in builds.items()],
                                   override_num_blocks=blocks).flat_map(
        _decode, **decode_options, **({"num_cpus": spec.decode_cpus} if spec.decode_cpus is not None else {}))
    actor_options: dict[str, Any] = {"num_gpus": num_gpus}
    if spec.encoder_cpus is not None:
        actor_options["num_cpus"] = spec.encoder_cpus
    if spec.encoder_resources:
        actor_options["resources"] = spec.encoder_resources
    if spec.encoder_memory_gib:
        actor_options["memory"] = int(spec.encoder_memory_gib * 2**30)
    pipeline = pipeline.map_batches(
        _Encoder, compute=ray.data.ActorPoolStrategy(size=spec.encoders), batch_size=spec.batch_size,
        batch_format="numpy", fn_constructor_kwargs={"base": base, "device": spec.device, "output": spec.output,
                                                     "batch_size": spec.batch_size, "threads": spec.encoder_threads},
        **actor_options)
    sink = _RunSink(str(spec.output), folder)
    pipeline.write_datasink(sink)
    for returned in sink.returns:
        result.files += returned.records
        result.counts.update(returned.counts)
        result.rejects += returned.rejects
        for dataset, clip in returned.live:
            result.live[dataset].append(clip)
    return result


def _position(clip: LiveClip) -> tuple[int, int]:
    return clip.video_index, clip.clip_index


def run_ingest(spec: IngestSpec, *, prune_after: bool = False) -> IngestResult:
    """Ingest every dataset of `spec` into `spec.output` on the connected (or a new local) Ray cluster."""
    if not spec.output:
        raise ValueError("ingest spec has no `output`: set it in the spec or pass --output")
    spec = spec.with_model_defaults()
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    store = IngestStore(spec.output)
    index = RowIndex.committed(store.state())
    run_id = new_run_id()
    temp = store.run_folder(run_id, temporary=True)
    summaries = {d.name: DatasetSummary() for d in spec.datasets}
    rejects: list[Reject] = []
    files: list[DataFile] = []
    states: dict[str, DatasetState] = {}
    groups: dict[str, list[IngestDataset]] = defaultdict(list)
    for dataset in spec.datasets:
        groups[spec.base_of(dataset)].append(dataset)
    for base, datasets in groups.items():
        items, listed = [], []
        for dataset in datasets:
            found, failed = _list_dataset(dataset)
            rejects += failed
            if found:
                listed.append(dataset)
                items += [{"dataset": dataset.name, **dataclasses.asdict(item)} for item in found]
        if not items:
            continue
        group = _run_group(spec, base, listed, items, index, temp)
        files += group.files
        rejects += group.rejects
        for dataset in listed:
            summary = summaries[dataset.name]
            summary.encoded, summary.reused, summary.kept = (group.counts[dataset.name, status]
                                                             for status in (ENCODED, REUSED, KEPT))
            states[dataset.name] = DatasetState(
                base=base, vae_id=group.vae_id, text_encoder_id=group.text_encoder_id, concept=dataset.concept,
                spec=dataset.model_dump(mode="json"), clips=sorted(group.live[dataset.name], key=_position))
    for reject in rejects:
        summaries[reject.dataset].rejected += 1
    commit = store.commit_run(run_id, files, rejects, states,
                              {name: dataclasses.asdict(s) for name, s in summaries.items()})
    result = IngestResult(str(spec.output), run_id, commit, summaries, rejects, time.perf_counter() - started)
    if prune_after:
        result.pruned_commit = prune(str(spec.output))
    return result
