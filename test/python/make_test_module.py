"""Writes the TorchScript module the runtime tests load (test/.cache/ops.pt).

Run with a Python that has torch: python make_test_module.py <out.pt>
"""
import sys
from typing import List, Optional, Tuple

import torch
from torch import Tensor


class Ops(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight

    @torch.jit.export
    def add_scaled(self, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
        return a + alpha * b

    @torch.jit.export
    def split_pair(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x[0], x[1]

    @torch.jit.export
    def sum_list(self, xs: List[Tensor]) -> Tensor:
        out = torch.zeros_like(xs[0])
        for x in xs:
            out = out + x
        return out

    @torch.jit.export
    def reshape_to(self, x: Tensor, dims: List[int]) -> Tensor:
        return x.reshape(dims)

    @torch.jit.export
    def maybe_scale(self, x: Tensor, scale: Optional[float]) -> Tensor:
        if scale is None:
            return x
        return x * scale

    @torch.jit.export
    def describe(self, x: Tensor, n: int, flag: bool) -> Tuple[int, float, bool, str, List[int]]:
        return n * 2, float(x.sum()), not flag, "ok", [n, n + 1]

    @torch.jit.export
    def fail(self, x: Tensor) -> Tensor:
        if bool(x.sum() > -1e30):
            raise RuntimeError("deliberate failure inside TorchScript")
        return x

    @torch.jit.export
    def write_slot(self, cache: Tensor, value: Tensor, position: int) -> int:
        # In-place write into a tensor the caller owns (how the KV cache is filled).
        cache[position] = value
        return position

    @torch.jit.export
    def zeros(self, n: int) -> Tensor:
        # An allocation of the caller's size (host out-of-memory tests).
        return torch.zeros([n])

    @torch.jit.export
    def busy(self, iterations: int) -> Tensor:
        # Deterministic CPU-heavy work for event-loop tests: iterations x (256x256 matmul).
        a = torch.full([256, 256], 1.0 / 256.0)
        acc = torch.zeros([256, 256])
        for _ in range(iterations):
            acc = acc + a @ a
        return acc[0, 0:1]


if __name__ == "__main__":
    torch.jit.save(torch.jit.script(Ops()), sys.argv[1])
