"""The activation functions Hugging Face's ACT2FN maps config strings to, as a scriptable module."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError

# Names accepted in `hidden_act` / `activation_function`, with the function HF uses for each.
SUPPORTED = (
    "gelu",               # exact (erf) GELU
    "relu",
    "gelu_new",           # tanh approximation written out (GPT-2)
    "gelu_fast",          # another tanh approximation
    "gelu_pytorch_tanh",  # F.gelu(approximate="tanh")
    "quick_gelu",         # x * sigmoid(1.702 x)
    "silu", "swish",
    "tanh", "sigmoid",
)


class Activation(nn.Module):
    name: torch.jit.Final[str]

    def __init__(self, name: str):
        super().__init__()
        if name not in SUPPORTED:
            raise ExportError(f"unsupported activation function {name!r} (supported: {', '.join(SUPPORTED)})")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.name
        if name == "gelu":
            return F.gelu(x)
        if name == "relu":
            return F.relu(x)
        if name == "gelu_new":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        if name == "gelu_fast":
            return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
        if name == "gelu_pytorch_tanh":
            return F.gelu(x, approximate="tanh")
        if name == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        if name == "silu" or name == "swish":
            return F.silu(x)
        if name == "tanh":
            return torch.tanh(x)
        return torch.sigmoid(x)
