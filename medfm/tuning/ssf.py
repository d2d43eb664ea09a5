"""SSF: scaling and shifting your features (Lian et al., NeurIPS 2022, https://arxiv.org/abs/2210.08823).

After every linear, convolution and normalisation layer of a frozen encoder, a
learnable per-channel affine ``y = gamma * y + beta`` is applied (forward
hooks, so the encoder's code and parameter names are untouched). Because each
follows a linear operation, :func:`merge_ssf` folds it into that layer's weight
and bias afterwards: the merged encoder is a plain encoder with the same
outputs and no extra cost at inference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_TARGETS = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d)


def _channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[-1]
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        return m.out_channels
    return m.num_features


def _channel_dim(m: nn.Module) -> int:
    return -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1


class SSF(nn.Module):
    """The scale/shift parameters of one encoder, keyed by layer name (dots as ``__``), and their hooks."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.scale, self.shift = nn.ParameterDict(), nn.ParameterDict()
        self._handles = []
        for name, m in encoder.named_modules():
            if not isinstance(m, _TARGETS) or (isinstance(m, nn.LayerNorm) and not m.elementwise_affine):
                continue
            key = name.replace(".", "__")
            c = _channels(m)
            self.scale[key] = nn.Parameter(1.0 + 0.02 * torch.randn(c))
            self.shift[key] = nn.Parameter(0.02 * torch.randn(c))
            self._handles.append(m.register_forward_hook(self._hook(key, _channel_dim(m))))

    def _hook(self, key: str, dim: int):
        def apply(module, inputs, output):
            shape = [1] * output.ndim
            shape[dim] = -1
            return output * self.scale[key].view(shape) + self.shift[key].view(shape)

        return apply

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def add_ssf(encoder: nn.Module) -> nn.Module:
    """Attach SSF to ``encoder`` in place (as ``encoder.ssf``) and return it."""
    if hasattr(encoder, "ssf"):
        raise ValueError("this encoder already has SSF")
    encoder.ssf = SSF(encoder)
    return encoder


@torch.no_grad()
def merge_ssf(encoder: nn.Module) -> nn.Module:
    """Fold ``encoder.ssf`` into the layers it follows and remove it (in place); outputs are unchanged."""
    ssf: SSF = encoder.ssf
    ssf.remove()
    modules = dict(encoder.named_modules())
    for key in ssf.scale.keys():
        m = modules[key.replace("__", ".")]
        s, b = ssf.scale[key], ssf.shift[key]
        w = m.weight
        view = [-1] + [1] * (w.ndim - 1)
        w.mul_(s.view(view))
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(s), requires_grad=w.requires_grad)
        m.bias.mul_(s).add_(b)
    del encoder.ssf
    return encoder
