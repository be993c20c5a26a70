"""torch modules: ``QuantLinear`` and ``quantize_model``.

``QuantLinear`` stores the weight ``W`` (out x in) of a linear layer as a
:class:`nqlib.QuantizedMatrix` of ``W.T``: the rows of ``W`` are the quantized
vectors, so every output is an inner product between an activation row and a
quantized weight row -- the setting of the book. Optionally the activations
are quantized on the fly too (``act_rate``), with the same seed, so both
operands share the rotation and the product is formed in the rotated domain.

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nqlib import _backend
from nqlib.matmul import matmul
from nqlib.quantizers.matrix import QuantizedMatrix, quantize

__all__ = ["QuantLinear", "quantize_model", "QuantizationReport"]


class QuantLinear(torch.nn.Module):
    """A linear layer whose weight is stored as nqlib codes.

    Build one with :meth:`from_linear`. The state dict holds the weight as
    the exact bytes of its :class:`~nqlib.QuantizedMatrix` (buffer
    ``qweight``, uint8) plus the float bias, so saving and loading keep the
    compressed size.

    Parameters
    ----------
    in_features, out_features : int
    qweight : QuantizedMatrix
        The quantized ``W.T`` (shape ``(in_features, out_features)``).
    bias : torch.Tensor or None
    act_rate : float or None
        Quantize the inputs of every call at this rate (same method and seed
        as the weight; for the rtn baselines the integer bit width).
    act_mode : {"variable", "fixed"}
        Mode of the activation quantizer (nested method).

    Notes
    -----
    On CPU the forward pass decodes the weight once (numba) and caches the
    dequantized float32 matrix; with activation quantization it runs
    :func:`nqlib.matmul` on the two quantized operands.
    """

    def __init__(self, in_features, out_features, qweight: QuantizedMatrix,
                 bias=None, *, act_rate=None, act_mode="variable"):
        super().__init__()
        if qweight.shape != (in_features, out_features):
            raise ValueError(f"qweight has shape {qweight.shape}, expected "
                             f"{(in_features, out_features)}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.act_rate = None if act_rate is None else float(act_rate)
        self.act_mode = act_mode
        self.register_buffer("qweight", torch.from_numpy(
            np.frombuffer(qweight.to_bytes(), dtype=np.uint8).copy()))
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().clone().float(),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._qw = qweight
        self._w_cache = None

    # ------------------------------------------------------------- building
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rate: float = 4.0,
                    act_rate=None, seed: int = 0, *, method: str = "nested",
                    mode: str = "fixed", act_mode: str = "variable",
                    **quantize_kwargs) -> QuantLinear:
        """Quantize ``linear.weight`` (its rows are the vectors).

        Parameters
        ----------
        linear : torch.nn.Linear
        rate : float
            Weight rate in bits per entry (see :func:`nqlib.quantize`).
        act_rate : float or None
            Activation rate, or None to keep activations in float.
        seed : int
            Shared seed of weight and activation quantizers.
        method, mode : str
            As in :func:`nqlib.quantize`; ``mode="fixed"`` (random access)
            is the default for weights.
        **quantize_kwargs
            Passed to :func:`nqlib.quantize` for the weight.
        """
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got "
                             f"{type(linear).__name__}")
        W = linear.weight.detach().to("cpu", torch.float64).numpy()
        mode_kw = {} if method in ("rtn", "rtn-hadamard") else {"mode": mode}
        qw = quantize(W.T, rate, seed=seed, method=method, **mode_kw,
                      **quantize_kwargs)
        return cls(linear.in_features, linear.out_features, qw, linear.bias,
                   act_rate=act_rate, act_mode=act_mode)

    # ------------------------------------------------------------ properties
    @property
    def quantized_weight(self) -> QuantizedMatrix:
        return self._qw

    @property
    def weight_bits_per_entry(self) -> float:
        return self._qw.bits_per_entry

    @property
    def weight_nbytes(self) -> int:
        return self._qw.nbytes

    def extra_repr(self) -> str:
        q = self._qw
        act = "None" if self.act_rate is None else f"{self.act_rate:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={q.method!r}, rate={q.rate:g} -> "
                f"{q.bits_per_entry:.3f} bit/entry, {q.nbytes} bytes, "
                f"act_rate={act}, bias={self.bias is not None}")

    def dequantized_weight(self) -> torch.Tensor:
        """The decoded weight ``W_hat`` (out x in), float32, cached."""
        if self._w_cache is None:
            self._w_cache = torch.from_numpy(
                self._qw.dequantize(np.float32).T.copy())
        return self._w_cache

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has last dimension {x.shape[-1]}, expected "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.act_rate is None:
            W = self.dequantized_weight().to(x.device)
            y = x2.to(W.dtype) @ W.T
        else:
            y = self._forward_quantized_acts(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.device, y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _forward_quantized_acts(self, x2):
        q = self._qw
        X = x2.detach().to("cpu", torch.float64).numpy()
        if X.shape[0] == 0:
            return torch.zeros(0, self.out_features, device=x2.device)
        kw = {} if q.method in ("rtn", "rtn-hadamard") else {"mode": self.act_mode}
        QX = quantize(X.T, self.act_rate, seed=q.seed, method=q.method, **kw)
        C = matmul(QX, q)  # (batch, out)
        return torch.from_numpy(C.astype(np.float32)).to(x2.device)

    # ------------------------------------------------------ state dict I/O
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "qweight"
        if key in state_dict:
            data = state_dict[key]
            try:
                qw = QuantizedMatrix.from_bytes(data.cpu().numpy().tobytes())
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
                return
            if qw.shape != (self.in_features, self.out_features):
                error_msgs.append(f"{key}: quantized weight has shape {qw.shape}, "
                                  f"expected {(self.in_features, self.out_features)}")
                return
            self.qweight = data.detach().clone().to(torch.uint8)
            self._qw = qw
            self._w_cache = None
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


# --------------------------------------------------------------- the model
@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did, layer by layer."""

    layers: list = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self.layers)

    @property
    def bits_per_entry(self) -> float:
        entries = sum(r["entries"] for r in self.layers)
        return 8.0 * self.bytes_after / entries if entries else float("nan")

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'shape':>12s} {'bit/entry':>9s} {'bytes':>10s}"]
        for r in self.layers:
            shape = "x".join(str(s) for s in r["shape"])
            lines.append(f"{r['name'][:40]:40s} {shape:>12s} "
                         f"{r['bits_per_entry']:9.3f} {r['bytes_after']:10d}")
        lines.append(f"{len(self.layers)} layers: {self.bytes_before} -> "
                     f"{self.bytes_after} bytes ({self.bits_per_entry:.3f} "
                     "bit/entry of weights)")
        return "\n".join(lines)


def quantize_model(model: torch.nn.Module, weight_rate: float = 4.0,
                   act_rate=None, method: str = "nested", seed: int = 0,
                   skip=(), *, mode: str = "fixed", act_mode: str = "variable",
                   progress: bool = True, **quantize_kwargs) -> QuantizationReport:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantLinear`, in
    place.

    Parameters
    ----------
    model : torch.nn.Module
    weight_rate : float
        Weight rate (bits per entry; the integer width for rtn methods).
    act_rate : float or None
        Quantize each replaced layer's input at this rate.
    method : {"nested", "rtn", "rtn-hadamard", "ecsq"}
    seed : int
    skip : iterable of str or callable
        Layer names (as in ``model.named_modules()``) to leave in float, or a
        predicate ``skip(name, module) -> bool``.
    mode, act_mode : {"fixed", "variable"}
        Modes of the weight and activation quantizers (nested method).
    progress : bool
        Show a progress bar over layers.

    Returns
    -------
    QuantizationReport
        Per layer: name, shape, bits/entry, bytes before (float32) and
        after.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, torch.nn.Module):
        raise ValueError("model must be a torch.nn.Module")
    skip_fn = skip if callable(skip) else (lambda name, mod, s=set(skip): name in s)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not skip_fn(name, mod)]
    report = QuantizationReport()
    for name, mod in tqdm(targets, desc="quantizing layers", disable=not progress):
        ql = QuantLinear.from_linear(mod, weight_rate, act_rate, seed,
                                     method=method, mode=mode, act_mode=act_mode,
                                     **quantize_kwargs)
        parent = model
        parts = name.split(".")
        for p in parts[:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], ql)
        report.layers.append(dict(
            name=name, shape=(mod.out_features, mod.in_features),
            entries=mod.out_features * mod.in_features,
            bits_per_entry=ql.weight_bits_per_entry,
            bytes_before=4 * mod.out_features * mod.in_features,
            bytes_after=ql.weight_nbytes))
    return report


def _is_cuda(x) -> bool:
    return _backend.is_torch_tensor(x) and x.device.type == "cuda"
