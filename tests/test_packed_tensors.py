"""A worker's batch tensors travel as one shared buffer and come back with their dtypes, shapes and values."""
import torch

from trainer.packed_tensors import PackedTensors, pack_tensors, unpack_tensors


def test_round_trip_keeps_dtypes_shapes_values_and_other_entries():
    batch = {"label": torch.tensor([3, 1, 2]), "token_logit": torch.randn(3, 5, 4).half(),
             "token_class": torch.randint(0, 9, (3, 5, 4), dtype=torch.int16), "flag": torch.tensor([True, False, True]),
             "params": torch.randn(3, 22), "empty": torch.zeros(0, 4), "meta": {"worker": 1}, "key": ["a", "b", "c"],
             "image": torch.randint(0, 255, (3, 5, 6, 3), dtype=torch.uint8).permute(0, 3, 1, 2)}  # NHWC in memory
    packed = pack_tensors(dict(batch))
    assert set(packed) == {"meta", "key", "packed"} and packed["packed"].data.is_shared()
    back = unpack_tensors(packed)
    assert set(back) == set(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
        else:
            assert back[k] == v
    assert back["image"].is_contiguous(memory_format=torch.channels_last)  # the collate's NHWC order is kept
    offsets = [offset for _, _, _, offset, _ in packed_layout(batch)]
    assert all(o % 16 == 0 for o in offsets)


def packed_layout(batch):
    return pack_tensors(dict(batch), shared=False)["packed"].layout


def test_pin_hook_and_a_batch_without_tensors(monkeypatch):
    """torch's pin step (this torch version) calls PackedTensors.pin_memory on the packed entry."""
    from torch.utils.data._utils.pin_memory import pin_memory as torch_pin_memory

    calls = []
    monkeypatch.setattr(PackedTensors, "pin_memory", lambda self: calls.append(self) or self)
    item = pack_tensors({"label": torch.arange(4), "meta": {}})
    torch_pin_memory(item)
    assert calls == [item["packed"]]
    assert pack_tensors({"meta": {"worker": 0}}) == {"meta": {"worker": 0}}
    assert unpack_tensors({"meta": {}, "x": 1}) == {"meta": {}, "x": 1}
