"""GraphedForward: a module's ``forward`` replayed as a CUDA graph per input signature (the identity encoders).

CLIP ViT-H/14, the face encoder and the text encoder run once per request but are
launch-bound at request batch sizes; ``model.fast.enable`` installs one per encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _clone_output(out):
    """Copy a graph's static output (tensor, tuple, or a transformers ModelOutput) for the caller."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_output(v) for v in out)
    if hasattr(out, "items") and hasattr(out, "keys"):
        return type(out)(**{k: _clone_output(v) for k, v in out.items()})
    return out


class GraphedForward:
    """A module's ``forward`` replayed as a CUDA graph per input signature.

    Installed as an instance attribute (``module.forward = GraphedForward(module)``), so the
    module object, its parameters, state-dict keys and attributes stay exactly as they were;
    ``uninstall()`` removes it. Used for the identity encoders: they run once per request, but
    ViT-H/14 on one crop is ~400 small kernels and the face encoder ~80, i.e. mostly launch
    overhead. Calls with CPU tensors, or inputs it has not seen, are run by the original
    forward (a new CUDA signature is captured on first use). Outputs are cloned, so a result
    stays valid after the next call.
    """

    def __init__(self, module: nn.Module, pool=None, warmup_runs: int = 2):
        self.module = module
        self.original = module.forward
        self.pool = pool
        self.warmup_runs = warmup_runs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], object]] = {}

    def install(self) -> "GraphedForward":
        self.module.forward = self
        return self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    @staticmethod
    def _signature(args: tuple, kwargs: dict) -> tuple | None:
        key = []
        for name, v in [(i, a) for i, a in enumerate(args)] + sorted(kwargs.items()):
            if isinstance(v, Tensor):
                if v.device.type != "cuda":
                    return None
                key.append((name, tuple(v.shape), v.dtype, v.device))
            elif v is None or isinstance(v, (bool, int, float, str)):
                key.append((name, v))
            else:
                return None
        return tuple(key)

    def __call__(self, *args, **kwargs):
        key = self._signature(args, kwargs)
        if key is None or torch.is_grad_enabled():  # training through it: the plain forward
            return self.original(*args, **kwargs)
        with torch.no_grad():
            return self._replay(key, args, kwargs)

    def _replay(self, key: tuple, args: tuple, kwargs: dict):
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args, kwargs)
        graph, inputs, out = entry
        live = [v for v in list(args) + [kwargs[k] for k in sorted(kwargs)] if isinstance(v, Tensor)]
        for static, new in zip(inputs, live):
            static.copy_(new)
        graph.replay()
        return _clone_output(out)

    def _capture(self, args: tuple, kwargs: dict):
        s_args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
        s_kwargs = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        inputs = [v for v in list(s_args) + [s_kwargs[k] for k in sorted(s_kwargs)] if isinstance(v, Tensor)]
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.original(*s_args, **s_kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.original(*s_args, **s_kwargs)
        return graph, inputs, out
