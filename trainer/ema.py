"""The weights' exponential moving average: timm's `ModelEmaV3`, without its per-update walk of two state_dicts.

timm's foreach update builds both models' `state_dict()` at every optimiser update (about 1 ms each for FAN-S
on a CPU core: a recursion over every module, 419 entries) and copies each integer buffer with a call of its
own, all host work in a host-bound step. `ModelEma` keeps the two tensor lists instead, pairs exactly as
timm's (state_dict order), and at each update checks by identity that every entry is still the tensor its
module holds (a `.to()`, `.float()` or `load_state_dict(assign=True)` puts new tensors there; then the lists
are built again). Same decay, warm-up, values and state_dict as `ModelEmaV3`
(tests/test_ema.py compares them update by update).
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3


def _owners(root: torch.nn.Module, state: dict) -> list[tuple[dict, str]] | None:
    """(the dict holding it, its name there) of each state_dict entry; None if some entry is not one of the
    modules' own parameters or buffers (a module's own `_save_to_state_dict`: timm's walk then)."""
    out = []
    for key in state:
        prefix, _, name = key.rpartition(".")
        try:
            module = root.get_submodule(prefix)
        except AttributeError:
            return None
        owner = module._parameters if name in module._parameters else module._buffers
        if owner.get(name) is not state[key]:
            return None
        out.append((owner, name))
    return out


class _Pairs:
    """The update's tensor lists for one (EMA, model) pair, and the identity checks that keep them true."""

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module):
        ema_state, model_state = ema.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        owners = (_owners(ema, ema_state), _owners(model, model_state))
        self.usable = None not in owners and len(ema_state) == len(model_state)
        self.model = model
        self.checks: list = []
        if not self.usable:  # kept (for this model) so the next update does not look again
            return
        self.checks = [(owner, name, t) for side, state in zip(owners, (ema_state, model_state)) if side
                       for (owner, name), t in zip(side, state.values())]
        pairs = list(zip(ema_state.values(), model_state.values()))
        self.float_ema = [e for e, _ in pairs if e.is_floating_point()]
        self.float_model = [m for e, m in pairs if e.is_floating_point()]
        self.other_ema = [e for e, _ in pairs if not e.is_floating_point()]
        self.other_model = [m for e, m in pairs if not e.is_floating_point()]

    def still_true(self, model: torch.nn.Module) -> bool:
        return model is self.model and all(owner.get(name) is t for owner, name, t in self.checks)


class ModelEma(ModelEmaV3):
    """`timm.utils.ModelEmaV3` with the foreach update's tensor lists kept between updates (see the module)."""

    _pairs: _Pairs | None = None

    @torch.no_grad()
    def apply_update_(self, model, decay: float):
        if not self.foreach or self.device is not None or self.dtype is not None:
            return super().apply_update_(model, decay)
        if self._pairs is None or not self._pairs.still_true(model):
            self._pairs = _Pairs(self.module, model)
        pairs = self._pairs
        if not pairs.usable:
            return super().apply_update_(model, decay)
        if pairs.other_ema:  # integer buffers (BatchNorm's step counts): copied, as timm does, in one call
            torch._foreach_copy_(pairs.other_ema, pairs.other_model)
        self._foreach_lerp_(pairs.float_ema, pairs.float_model, weight=1.0 - decay)
