"""torchrun data parallel on CPU (gloo): two real processes train a few steps and end with identical
weights (gradients all-reduced by DDP, BatchNorm statistics averaged after each epoch), and summary.json
lists the unreadable images that either rank met; a rank whose batch is all unreadable steps like the others
(EMA, GradScaler); on CUDA the process group reduces CPU tensors too."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import data, distributed, engine, recipe
from training.checkpoint import LAST, load_checkpoint, model_from_checkpoint
from training.distributed import state_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(small_digits, tmp_path):
    train_dir, val_dir = small_digits
    val_dir = shutil.copytree(val_dir, tmp_path / "val")
    for label in ("0", "1"):  # first of classes 0 and 1 = val samples 0 and 5: one in each rank's eval shard
        (val_dir / label / "-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.train", "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--device", "cpu", "--crop-size", "32", "--resize-size", "32", "--batch-size", "16",
        "--epochs", "2", "--steps-per-epoch", "2", "--workers", "0", "--threads", "1",
        # exercise the recipe under DDP: frozen then unfrozen backbone (DDP re-wrapped), bf16 autocast,
        # MixUp/CutMix, class-weighted loss, clipping, EMA
        "--freeze-epochs", "1", "--amp", "bf16", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
        "--class-balance", "loss", "--clip-grad-norm", "1.0", "--model-ema", "--no-progress", "--no-tensorboard",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ema_digests = summary["rank_ema_weight_digests"]
    assert len(ema_digests) == 2 and ema_digests[0] == ema_digests[1]
    checkpoint = load_checkpoint(out, prefer=LAST)
    assert state_digest(model_from_checkpoint(checkpoint, "model")) == digests[0]
    assert "1 processes" not in done.stderr and "x 2 process(es)" in done.stdout + done.stderr
    # unreadable images of every rank's shard are reported, not only rank 0's
    assert [Path(p).relative_to(val_dir).as_posix() for p in summary["skipped_images"]] == ["0/-broken.png", "1/-broken.png"]


def test_the_cuda_process_group_has_a_backend_for_cpu_tensors():
    """With "nccl" alone, the first all_reduce of the epoch's CPU totals failed under torchrun on GPUs ("No
    backend type associated with device type cpu"); torch's own parser reads the backend string here."""
    on_cuda = dist.BackendConfig(distributed.backend_for(torch.device("cuda"))).get_device_backend_map()
    assert on_cuda == {"cpu": "gloo", "cuda": "nccl"}
    assert dist.BackendConfig(distributed.backend_for(torch.device("cpu"))).get_device_backend_map()["cpu"] == "gloo"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: an nccl process group")
def test_a_cuda_process_group_reduces_cpu_and_cuda_tensors(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(distributed.backend_for(torch.device("cuda", 0)), store=store, rank=0, world_size=1)
    try:
        for device in ("cpu", "cuda"):
            tensor = torch.ones(3, dtype=torch.float64, device=device)
            dist.all_reduce(tensor)
            assert tensor.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def _step_with_an_unreadable_batch(rank: int, store: str, out: str) -> None:
    """One rank of two: rank 1's first batch is all unreadable files, rank 0's is not."""
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    ema, scaler = recipe.make_ema(model, 0.5), torch.amp.GradScaler("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(rank))
    readable = data.collate_skipping([(images[0], 0, 0), (images[1], 1, 1)])
    unreadable = data.collate_skipping([(None, 0, 2), (None, 1, 3)])
    loader = [unreadable if rank else readable, readable]
    step = engine.StepConfig(clip_grad_norm=1.0, progress=False, input_shape=(3, 8, 8))
    ctx = distributed.Context(rank=rank, world_size=2)
    engine.train_one_epoch(torch.nn.parallel.DistributedDataParallel(model), loader, torch.nn.CrossEntropyLoss(),
                           optimizer, scheduler, ctx, step, 0, ema=ema, scaler=scaler)
    for module in (model, ema.module):  # as training.loop does after each epoch: BatchNorm statistics are per rank
        distributed.average_buffers(module, ctx)
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"model": state_digest(model), "ema": state_digest(ema.module), "scaler": scaler.state_dict()}))
    distributed.shutdown(ctx)  # as training does: a barrier first
    # Then out without the interpreter's finalization, where DDP's and gloo's leftovers were destroyed after
    # the process group and 1 child in 12 to 36 died of "terminate called without an active exception"
    # (SIGABRT) after its results were written (pytorch/pytorch#179291 describes that finalization crash).
    os._exit(0)


def test_a_rank_whose_batch_is_all_unreadable_steps_like_the_others(tmp_path):
    """Its dummy step skipped the EMA update and stepped the optimizer past the GradScaler (scaled gradients,
    no scaler.update): the ranks' weights, EMA and scaler drifted apart without a word."""
    mp.spawn(_step_with_an_unreadable_batch, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["scaler"]["_growth_tracker"] == 2  # both steps went through the scaler
