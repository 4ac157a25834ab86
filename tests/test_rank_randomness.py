"""Per-rank randomness in two gloo processes: model init is the same on every rank; targets, mixing lam,
erasing and drop path differ between ranks and repeat exactly when drawn again (a fresh builder, the steps
in another order: each draw depends on (seed, rank, step) only)."""

import pytest
import torch
import torch.multiprocessing as mp
from gloo_ranks import become_rank, free_port


def worker(rank: int, world: int, port: int, out: str) -> None:
    become_rank(rank, world, port)
    from timm.layers import DropPath
    from test_train_loop import config
    from trainer.data_config import TokenLabelConfig
    from trainer.distributed import any_rank, seed_step, shutdown_distributed, sum_over_ranks
    from trainer.run_stage import _prepare, build_model
    from trainer.target_builder import TargetBuilder

    cfg = config(**{"model.name": "fan_test_p4_hybrid_token", "model.num_classes": 10, "data.reprob": 1.0})
    info = _prepare(cfg, out)  # joins the group, seeds the init the same way on every rank
    assert info.world_size == world and info.rank == rank
    model = build_model(cfg)
    g = torch.Generator().manual_seed(123)  # the same batch on both ranks: any difference is the draws'
    batch = {"image": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g),
             "label": torch.tensor([0, 1, 2, 3]), "token_logit": torch.randn(4, 16, 10, generator=g).half()}
    builder = TargetBuilder(num_classes=10, data=cfg.data, tokens=TokenLabelConfig(), store_grid=(4, 4),
                            seed=cfg.data.seed, rank=info.rank)
    drop = DropPath(0.5).train()

    def draw(builder, step):
        seed_step(cfg.data.seed, info.rank, step)  # what trainer.loop does before each micro-batch
        images, cls_t, tok_t = builder(batch, step)
        return {"images": images, "cls": cls_t, "tokens": tok_t, "lam": builder.last_mix.lam,
                "kind": builder.last_mix.kind, "drop": drop(torch.ones(8, 4))}

    got = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
           "steps": [draw(builder, step) for step in range(4)]}
    again = TargetBuilder(num_classes=10, data=cfg.data, tokens=TokenLabelConfig(), store_grid=(4, 4),
                          seed=cfg.data.seed, rank=info.rank)
    out_of_order = {step: draw(again, step) for step in (3, 1, 2, 0)}
    got["again"] = [out_of_order[step] for step in range(4)]
    assert any_rank(info, rank == 1) == [True]  # the control-flag all-reduce agrees across ranks
    assert sum_over_ranks(info, rank + 1, 5) == [3, 10]  # host counts (skipped samples) summed on the same group
    torch.save(got, f"{out}/rank{rank}.pt")
    shutdown_distributed(info)


@pytest.mark.timeout(300)
def test_ranks_draw_differently_and_repeat_on_rerun(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a0, a1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for name, w in a0["weights"].items():  # identical init on both ranks
        assert torch.equal(w, a1["weights"][name]), name
    for key in ("images", "cls", "tokens", "drop"):
        for s0, s1 in zip(a0["steps"], a1["steps"]):
            assert not torch.equal(s0[key], s1[key]), f"{key}: the two ranks drew the same"
    lams = [(s["kind"], s["lam"]) for s in a0["steps"]], [(s["kind"], s["lam"]) for s in a1["steps"]]
    assert lams[0] != lams[1] and any(k != "none" for k, _ in lams[0])
    for run in (a0, a1):  # drawn again, out of order: every draw of every rank repeats exactly
        for sa, sb in zip(run["steps"], run["again"], strict=True):
            assert sa["lam"] == sb["lam"] and sa["kind"] == sb["kind"]
            for key in ("images", "cls", "tokens", "drop"):
                assert torch.equal(sa[key], sb[key]), key


def test_one_process_sums_and_flags_are_its_own():
    from trainer.distributed import DistInfo, any_rank, sum_over_ranks
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert sum_over_ranks(info, 4, 0) == [4, 0]
    assert any_rank(info, True, False) == [True, False]


def test_seed_step_reseeds_torchs_generator_without_formatting_stacks(monkeypatch):
    import traceback

    from trainer.distributed import seed_step

    seed_step(5, 0, 7)
    first = torch.rand(4)
    seed_step(5, 0, 8)
    assert not torch.equal(torch.rand(4), first)  # another step, other numbers
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: pytest.fail("a stack was formatted"))
    seed_step(5, 0, 7)
    assert torch.equal(torch.rand(4), first)  # the same step, the same numbers
