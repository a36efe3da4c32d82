"""Swap a changed weight in per forward, never writing the stored model.

:func:`swapped` is the mechanism of the experiments that change *many* weights at once (RTN
quantization, pruning to a sparsity): writing the change in place and restoring it would need a
copy of every changed value (half the model for a 50 % pruning), so instead each target's changed
weight is made in the model's dtype just before a module that reads it runs, swapped in for that
forward and swapped back right after (forward pre-hook / hook, undone in ``finally``).  The stored
tensors are never written, so the model is bit-exactly itself after every condition, and memory
beyond the model is one tensor's changed copy at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from esa.model.targets import Target

# (target, its whole weight as the forward reads it) -> the weight the forward should read instead
Make = Callable[[Target, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def swapped(targets: list[Target], make: Make) -> Iterator[None]:
    """Inside the block every forward reads ``make(t, w)`` (cast to ``w``'s dtype) for each target ``t``
    instead of its weight ``w``; the stored weights are never written (see the module docstring)."""
    handles = []
    swapped_now: dict[str, list] = {}  # target name -> [original data, depth, parameter]

    def make_hooks(t: Target, attr: str):
        # the weight is looked up as the forward starts: under --shard fsdp the module then holds the
        # gathered whole weight (a tensor FSDP frees after the block), never the stored shard
        def pre(module, _args):
            state = swapped_now.setdefault(t.name, [None, 0, None])
            if state[1] == 0:
                w = getattr(module, attr)
                state[0], state[2] = w.data, w
                w.data = make(t, w).to(state[0].dtype)
            state[1] += 1

        def post(_module, _args, _out):
            state = swapped_now[t.name]
            state[1] -= 1
            if state[1] == 0:
                state[2].data = state[0]
                state[0] = state[2] = None
        return pre, post

    try:
        for t in targets:
            for u in {id(u.module): u for u in t.uses}.values():
                pre, post = make_hooks(t, u.attr)
                handles.append(u.module.register_forward_pre_hook(pre))
                handles.append(u.module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        for t in targets:  # a forward that raised left its weight swapped
            state = swapped_now.get(t.name)
            if state is not None and state[0] is not None:
                state[2].data = state[0]
