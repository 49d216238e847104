"""Data-parallel training in 2 processes on gloo (CPU, tiny model): per-rank draws, identical LoRAs,
rank 0 alone writing, exact resume, and equivalence with 1 rank accumulating the same draws."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_loop import make_config, metrics, weights

from motiondirector.events import CheckpointWritten, Recorder, TrainStarted, TrainStep
from motiondirector.train.engine import _free_port
from motiondirector.train.loop import TrainingInterrupted, train
from motiondirector.train.ranks import Ranks, resolve_ranks, shard, shard_group, stream_seed
from motiondirector.train.synthetic import synthetic_records

# Two videos (two spatial LoRAs), spatial skips and LoRA dropout: adapters sit steps out on one rank
# only, and every random source of a step is exercised.
OVERRIDES = ("steps=4", "spatial_skip_probability=0.5", "optimizer.weight_decay=0.1", "seed=3", "checkpoint_every=3")
TIMEOUT_S = 300


def _rank_main(rank: int, world: int, port: int, model_dir: str, tmp: str,
               runs: dict[str, tuple[str, ...]]) -> None:
    """One rank of each run in turn (one process start for all: spawning costs most of the time)."""
    from motiondirector.backbones import load_backbone

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        backbone = load_backbone(model_dir, "cpu")
        for label, overrides in runs.items():
            _interrupted_and_resumed(rank, backbone, Path(tmp) / label, overrides)
    finally:
        torch.distributed.destroy_process_group()


def _interrupted_and_resumed(rank: int, backbone, tmp: Path, overrides: tuple[str, ...]) -> None:
    """One rank's run: interrupted (rank 0 gets SIGTERM after step 2), then --resume to the end."""
    from motiondirector.lora.inject import adapter_parameters

    records = synthetic_records(backbone, videos=2)
    config = make_config(*overrides)
    out = tmp / f"rank{rank}"  # each rank names its own folder: only rank 0's may appear
    recorder, final, resumed = Recorder(), {}, []

    def observe(event):
        recorder(event)
        if isinstance(event, TrainStep) and event.step == 2 and rank == 0 and not resumed:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank stops: all must checkpoint and stop
        if isinstance(event, TrainStep) and event.step == config.steps:
            final.update({name: [p.detach().clone() for p in adapter_parameters(backbone.unet, name)]
                          for name in ("spatial_0", "spatial_1", "temporal")})

    interrupted = None
    try:
        train(config, out, backbone=backbone, records=records, observers=[observe])
    except TrainingInterrupted as stopped:
        interrupted = stopped.step
    resumed.append(True)
    summary = train(config, out, resume=True, backbone=backbone, records=records, observers=[observe])
    torch.save({"interrupted": interrupted, "summary": summary.to_json(), "weights": final,
                "steps": [e.metrics for e in recorder.of(TrainStep)],
                "started": [(e.rank, e.world_size, e.start_step) for e in recorder.of(TrainStarted)],
                "checkpoints": [e.step for e in recorder.of(CheckpointWritten)]},
               tmp / f"result-{rank}.pt")


def run_ranks(world: int, tiny_model_dir: Path, tmp: Path, runs: dict[str, tuple[str, ...]]) -> dict[str, list[dict]]:
    for label in runs:
        (tmp / label).mkdir()
    context = mp.start_processes(_rank_main, args=(world, _free_port(), str(tiny_model_dir), str(tmp), runs),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    return {label: [torch.load(tmp / label / f"result-{rank}.pt", weights_only=False) for rank in range(world)]
            for label in runs}


def accumulated_reference(tiny_backbone, tmp_path: Path, overrides: tuple[str, ...]) -> Path:
    """1 rank taking the same 2 draws per step (gradient_accumulation=2), uninterrupted."""
    out = tmp_path / "one-rank"
    train(make_config(*overrides, "gradient_accumulation=2"), out, backbone=tiny_backbone,
          records=synthetic_records(tiny_backbone, videos=2))
    return out


def check_two_ranks(results: list[dict], tmp_path: Path, reference: Path, atol: float) -> None:
    first, second = results
    # Rank 0 got the signal; both ranks stopped after step 2 and resumed from that checkpoint.
    assert first["interrupted"] == second["interrupted"] == 2
    assert [s[:2] for s in first["started"]] == [(0, 2), (0, 2)] and [s[:2] for s in second["started"]] == [(1, 2)] * 2
    assert [s[2] for s in first["started"]] == [0, 2]

    # Per-rank draws: the shards split the two clips, and the streams differ.
    assert {entry["record"] for entry in first["steps"]} == {0} and {entry["record"] for entry in second["steps"]} == {1}
    assert [e["timestep"] for e in first["steps"]] != [e["timestep"] for e in second["steps"]]
    # ...but the updates agree: same adapters stepped on both ranks, and identical LoRA weights.
    assert [e["updated"] for e in first["steps"]] == [e["updated"] for e in second["steps"]]
    assert first["weights"].keys() == second["weights"].keys()
    for name, params in first["weights"].items():
        assert all(torch.equal(a, b) for a, b in zip(params, second["weights"][name], strict=True)), name

    # Only rank 0 wrote a run folder; both ranks return its summary.
    assert not (tmp_path / "rank1").exists()
    run = tmp_path / "rank0"
    assert first["summary"] == second["summary"] and first["summary"]["out_dir"] == str(run)
    assert first["summary"]["resumed_from"] == 2 and first["checkpoints"] == [2, 3, 4]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert [m["record"] for m in metrics(run)] == [0, 0, 0, 0]  # rank 0's draws

    # 2 ranks x 1 draw == 1 rank x 2 accumulated draws (same streams, same shards, mean of the gradients).
    assert [m["record"] for m in metrics(reference)] == [[0, 1]] * 4
    assert [m["timestep"] for m in metrics(reference)] == [[a["timestep"], b["timestep"]]
                                                           for a, b in zip(first["steps"], second["steps"], strict=True)]
    expected, got = weights(reference), weights(run)
    assert expected.keys() == got.keys() == {"temporal", "spatial/0", "spatial/1"}
    for name in expected:
        for key, tensor in expected[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=atol, msg=f"{name}: {key}")


def test_two_ranks_on_gloo_torch_and_deepspeed_zero2_match_one_rank_accumulating_their_draws(
        tiny_model_dir, tiny_backbone, tmp_path):
    """Both engines, each interrupted and resumed. DeepSpeed: ZeRO-2 over 2 ranks that draw their own
    clips (adapters computed on one rank only), resumed from a checkpoint holding both ranks'
    optimizer partitions. Tolerance: 1e-6 absolute per LoRA weight after 4 steps (measured: 0.0)."""
    torch.set_num_threads(1)
    runs = {"torch": OVERRIDES, "deepspeed": (*OVERRIDES, "engine.kind=deepspeed", "engine.zero_stage=2")}
    results = run_ranks(2, tiny_model_dir, tmp_path, runs)
    reference = accumulated_reference(tiny_backbone, tmp_path, OVERRIDES)
    for label in runs:
        check_two_ranks(results[label], tmp_path / label, reference, atol=1e-6)


def test_streams_and_shards():
    # same inputs, same seed; any changed input, another one
    assert stream_seed(0, 0, 1, 0) == stream_seed(0, 0, 1, 0)
    assert len({stream_seed(*key) for key in [(0, 0, 1, 0), (1, 0, 1, 0), (0, 1, 1, 0), (0, 0, 2, 0), (0, 0, 1, 1)]}) == 5
    assert [shard(range(5), slot, 2) for slot in range(2)] == [[0, 2, 4], [1, 3]]
    # fewer records than slots: slot g takes record g mod n
    assert [shard(range(2), slot, 4) for slot in range(4)] == [[0], [1], [0], [1]]
    # an image and its mirrored copy (weighted variants of one source) stay in one shard
    images = [shard_group(i, True, i // 2) for i in range(4)]  # 2 images x (original, mirrored)
    assert [shard(images, slot, 2) for slot in range(2)] == [[0, 1], [2, 3]]
    assert [shard(images[:2], slot, 2) for slot in range(2)] == [[0, 1], [0, 1]]
    assert shard([shard_group(i, False, 0) for i in range(3)], 1, 2) == [1]  # clips of one video: per record
    with pytest.raises(ValueError, match="no records"):
        shard([], 0, 1)


def test_rank_arguments_and_the_process_group(monkeypatch):
    # (a DeepSpeed test may have initialised a world of one in this process: pretend either way)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert resolve_ranks() == Ranks(0, 1)
    with pytest.raises(ValueError, match="needs an initialised torch.distributed"):
        resolve_ranks(1, 2)
    with pytest.raises(ValueError, match="need 0 <= rank"):
        resolve_ranks(1, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    assert resolve_ranks() == resolve_ranks(1, 3) == resolve_ranks(world_size=3) == Ranks(1, 3)
    with pytest.raises(ValueError, match="rank 0 of 3 given, but torch.distributed says rank 1 of 3"):
        resolve_ranks(0)
