"""Two-process DDP (gloo, CPU) smoke: both ranks train in lock-step, rank 0 alone writes the checkpoint."""

import pytest
import torch
import torch.multiprocessing as mp
from gloo_ranks import become_rank, free_port


def worker(rank: int, world: int, port: int, out: str) -> None:
    become_rank(rank, world, port)
    from test_train_loop import config, loss_fn
    from train_toy import ToySource, ToyTokenModel, make_targets
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.loop import train

    info = init_distributed("cpu")
    assert info.world_size == world and info.rank == rank
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    source = ToySource(shards=3, seed=rank)  # each rank its own data; rank 1 has a shard fewer below
    steps = 3 if rank == 0 else 2
    model = ToyTokenModel()
    result = train(model=model, arch="toy", cfg=config(epochs=2), out_dir=out,
                   epoch_batches=lambda e, p: list(source.epoch_batches(e, p))[:steps],
                   make_targets=make_targets, compute_loss=loss_fn, steps_per_epoch=3, info=info)
    torch.save({"updates": result.global_update, "weights": model.state_dict()}, f"{out}/rank{rank}.pt")
    shutdown_distributed(info)


@pytest.mark.timeout(180)
def test_two_process_gloo_ddp(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)
    # rank 1 ran dry after 2 batches: both ranks stopped the epoch together (no hang), same update count.
    assert r0["updates"] == r1["updates"] == 4  # 2 epochs (1 of them warmup) × 2 steps
    assert (tmp_path / "last.pth").exists() and (tmp_path / "metrics.jsonl").exists()
    saved = torch.load(tmp_path / "last.pth", weights_only=True)["state_dict"]
    for name, t in r0["weights"].items():  # gradients were averaged: the ranks hold the same weights
        assert torch.isfinite(t).all() and torch.equal(t, r1["weights"][name]) and torch.equal(t, saved[name]), name
