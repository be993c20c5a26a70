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

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from nqlib import _backend
from nqlib.matmul import _same_domain, matmul

# the torchao-style API lives in nqlib/nn_api.py (it imports this module
# lazily, inside its functions)
from nqlib.nn_api import (
    QuantConfig,
    QuantEmbedding,
    load_quantized,
    quantize_,
    save_quantized,
)
from nqlib.quantizers import cpu_layout as _cpu_layout
from nqlib.quantizers import matrix as _matrix
from nqlib.quantizers.matrix import QuantizedMatrix, quantize

__all__ = ["QuantLinear", "quantize_model", "QuantizationReport",
           "calibration_hessians", "QuantConfig", "quantize_",
           "QuantEmbedding", "save_quantized", "load_quantized"]


class QuantLinear(torch.nn.Module):
    """A linear layer whose weight is stored as nqlib codes.

    Build one with :meth:`from_linear`. The state dict holds the weight as
    the exact bytes of its :class:`~nqlib.QuantizedMatrix` (entry
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
    act_mode : {"variable", "fixed"}, optional
        Mode of the activation quantizer, as ``mode`` of
        :func:`nqlib.quantize` for the weight's method (None: that method's
        default, ``"variable"`` for the nested one). Only with ``act_rate``.
    act_cache : ActivationCache, optional
        Where the last quantized input is kept, so that layers fed the same
        tensor quantize it once; :func:`quantize_model` gives all the layers
        of a model one cache. By default the layer gets its own.

    Attributes
    ----------
    backend : {"auto", "numba", "torch", "triton"}
        Forward backend of this layer (an instance attribute; set it per
        layer). ``"auto"``: for CPU inputs the fused numba decode-matmul
        (:mod:`nqlib.kernels.cpu.fused`) when the layer holds a CPU layout
        (below), with float or quantized activations; for CUDA inputs the
        fused Triton decode-matmul (:mod:`nqlib.kernels.gpu.matmul_triton`)
        when the weight is a nested fixed-mode matrix without dither and
        activations stay in float; the torch path otherwise. ``"numba"``:
        always the fused CPU kernel; ``"torch"``: multiply with torch by the
        decoded weight (cached, except for a layer held as a CPU layout,
        whose weight is decoded on each call); ``"triton"``: always the
        fused Triton kernel (CPU tensors need ``TRITON_INTERPRET=1``).
    act_cache : ActivationCache
        The layer's activation cache (see above).

    Notes
    -----
    A nested fixed-mode weight without dither and with ``q <= 16`` (rates
    up to about 4.3 bits per entry) is held as its CPU layout alone
    (:mod:`nqlib.quantizers.cpu_layout`, about 4.9 bits per weight plus the
    file's side information): no float weight is kept, neither the file's
    bytes, which :attr:`qweight`, :attr:`quantized_weight` and the state
    dict rebuild from it. On CPU the forward pass runs the fused kernel on
    it for any batch shape, also with quantized activations (the decoded
    activation rows meet the weight in the rotated domain).
    :attr:`resident_nbytes` counts what the layer keeps. Other weights are
    held as their QuantizedMatrix; on CPU the forward pass decodes them once
    (numba) and caches the dequantized float32 matrix, and with activation
    quantization it runs :func:`nqlib.matmul` on the two quantized
    operands. The output has the input's dtype (bfloat16 and float16 inputs
    included; the arithmetic is float32). A layer may be called from
    several threads at once.
    """

    def __init__(self, in_features, out_features, qweight: QuantizedMatrix,
                 bias=None, *, act_rate=None, act_mode=None, act_cache=None):
        super().__init__()
        if qweight.shape != (in_features, out_features):
            raise ValueError(f"qweight has shape {qweight.shape}, expected "
                             f"{(in_features, out_features)}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if act_rate is not None:
            # the activation quantizer's own rules (range, integer widths for
            # the rtn methods, the modes the method has), checked now rather
            # than at the first forward
            act_rate = _matrix._check_rate(act_rate, qweight.method)
            _check_act_mode(act_mode, qweight.method)
        elif act_mode is not None:
            raise ValueError(f"act_mode={act_mode!r} does not apply without "
                             "act_rate (the activations stay in float)")
        if act_cache is not None and not isinstance(act_cache, ActivationCache):
            raise ValueError("act_cache must be an nqlib.nn.ActivationCache, got "
                             f"{type(act_cache).__name__}")
        self.act_rate = act_rate
        self.act_mode = act_mode
        self.act_cache = ActivationCache() if act_cache is None else act_cache
        self.backend = "auto"
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().clone().float(),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._set_weight(qweight)

    def _set_weight(self, qweight: QuantizedMatrix, data=None) -> None:
        """Hold ``qweight``: as its CPU layout alone when the fused kernel
        takes it (nested, fixed mode, no dither, ``q <= 16``), else as the
        QuantizedMatrix and its bytes (``data``, a uint8 tensor, when given)."""
        self._w_cache = None
        self._triton_layout = None
        self._rot_cache = None
        self._qw_ref = None
        self._file_nbytes = qweight.nbytes
        if _cpu_layout.supports(qweight) is None:
            # the packed layout and the file's side information only: the
            # codes are not kept twice and no float weight is kept at all;
            # the file's bytes are rebuilt from the layout when asked for
            self._layout = _cpu_layout.cpu_layout(qweight)
            lay = self._layout
            self._header = QuantizedMatrix(
                shape=qweight.shape, rate=qweight.rate, method=qweight.method,
                mode=qweight.mode, flags=qweight.flags, seed=qweight.seed,
                alpha=qweight.alpha, means=lay.means, norms=lay.norms,
                payload=None, version=qweight.version)
            self._qw = None
            self._qbytes = None
        else:
            self._layout = None
            self._header = self._qw = qweight
            self._qbytes = (data.detach().clone().to(torch.uint8) if data is not None
                            else torch.from_numpy(np.frombuffer(
                                qweight.to_bytes(), dtype=np.uint8).copy()))

    # ------------------------------------------------------------- building
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, weight_rate: float = 4.0,
                    act_rate=None, seed: int = 0, *, method: str = "nested",
                    mode: str | None = None, act_mode: str | None = None,
                    hessian=None, **quantize_kwargs) -> QuantLinear:
        """Quantize ``linear.weight`` (its rows are the vectors).

        Parameters
        ----------
        linear : torch.nn.Linear
        weight_rate : float
            Weight rate in bits per entry (see :func:`nqlib.quantize`); the
            same argument names as :func:`quantize_model` and
            :class:`nqlib.nn.QuantConfig`.
        act_rate : float or None
            Activation rate, or None to keep activations in float.
        seed : int
            Shared seed of weight and activation quantizers.
        method : {"nested", "nested-ldlq", "rtn", "rtn-hadamard", "ecsq"}
            As in :func:`nqlib.quantize`, or ``"nested-ldlq"``: the
            fixed-mode nested quantizer with Hessian-aware rounding
            (:func:`nqlib.quantizers.ldlq.quantize_ldlq`; needs ``hessian``).
        mode : {"fixed", "variable"}, optional
            As in :func:`nqlib.quantize`. None: ``"fixed"`` (random access)
            for the nested methods -- the default for weights, and the only
            mode of ``"nested-ldlq"`` -- and the method's own mode for the
            baselines.
        act_mode : {"variable", "fixed"}, optional
            Mode of the activation quantizer (None: the method's default);
            only with ``act_rate``.
        hessian : array_like, shape (in_features, in_features), optional
            Second moment ``E[x x^T]`` of the layer's inputs, for
            ``method="nested-ldlq"`` (see :func:`calibration_hessians`).
        **quantize_kwargs
            Passed to :func:`nqlib.quantize` (or ``quantize_ldlq``, e.g.
            ``damp``) for the weight.

        Raises
        ------
        ValueError
            ``linear`` is not a ``torch.nn.Linear``; ``method="nested-ldlq"``
            without ``hessian`` or with ``mode="variable"``; ``hessian`` with
            another method; ``act_mode`` without ``act_rate``; a keyword
            argument the method's quantizer does not have (e.g. ``damp``
            without ``"nested-ldlq"``); anything :func:`nqlib.quantize`
            rejects, an option value the method does not implement included.
        """
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got "
                             f"{type(linear).__name__}")
        if act_rate is None and act_mode is not None:
            raise ValueError(f"act_mode={act_mode!r} does not apply without "
                             "act_rate (the activations stay in float)")
        W = linear.weight.detach().to("cpu", torch.float64).numpy()
        if method == "nested-ldlq":
            from nqlib.quantizers.ldlq import quantize_ldlq

            if hessian is None:
                raise ValueError("method='nested-ldlq' needs hessian= (the "
                                 "second moment of the layer's inputs)")
            if mode not in (None, "fixed", "trellis"):
                raise ValueError("method='nested-ldlq' codes the fixed or the "
                                 f"trellis mode, got mode={mode!r}")
            if mode == "trellis":  # the Viterbi search as the block quantizer
                from nqlib.quantizers.trellis import quantize_ldlq
            _check_keywords(quantize_ldlq, quantize_kwargs, method)
            qw = quantize_ldlq(W.T, weight_rate, hessian, seed=seed,
                               **quantize_kwargs)
        elif hessian is not None:
            raise ValueError(f"hessian= is used by method='nested-ldlq' only, "
                             f"got method={method!r}")
        else:
            if mode is None and method == "nested":
                mode = "fixed"  # random access: the default for weights
            _check_keywords(quantize, quantize_kwargs, method)
            qw = quantize(W.T, weight_rate, seed=seed, method=method, mode=mode,
                          **quantize_kwargs)
        return cls(linear.in_features, linear.out_features, qw, linear.bias,
                   act_rate=act_rate, act_mode=act_mode)

    # ------------------------------------------------------------ properties
    @property
    def quantized_weight(self) -> QuantizedMatrix:
        """The weight's QuantizedMatrix. For a layer held as a CPU layout it
        is rebuilt from the packed codes (the same bytes) and not kept: only
        a weak reference, so that it is rebuilt again only once the caller
        has dropped it."""
        if self._qw is not None:
            return self._qw
        qm = self._qw_ref() if self._qw_ref is not None else None
        if qm is None:
            qm = self._layout.to_quantized()
            self._qw_ref = weakref.ref(qm)
        return qm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_qw_ref"] = None          # a weak reference is not pickled
        return state

    @property
    def qweight(self) -> torch.Tensor:
        """The bytes of the weight's QuantizedMatrix (uint8), the state
        dict's ``qweight`` entry; rebuilt from the layout on each access when
        the layer holds one."""
        if self._qbytes is not None:
            return self._qbytes
        return torch.from_numpy(np.frombuffer(self._layout.to_bytes(),
                                              dtype=np.uint8).copy())

    @property
    def cpu_layout(self):
        """The :class:`~nqlib.quantizers.cpu_layout.CpuLayout` the fused CPU
        kernel reads, or None when the weight is held as a QuantizedMatrix
        (other methods and modes, dither, ``q > 16``)."""
        return self._layout

    @property
    def weight_bits_per_entry(self) -> float:
        return 8.0 * self._file_nbytes / (self.in_features * self.out_features)

    @property
    def weight_nbytes(self) -> int:
        return self._file_nbytes

    def resident_arrays(self) -> dict:
        """Every array and tensor the layer keeps (weight codes, side
        information, bias, caches), by name; the activation cache, which
        holds the last input and is shared by a model's layers, is not
        included."""
        out = {}
        if self._layout is not None:
            out.update({f"layout.{k}": v for k, v in self._layout.arrays().items()})
        if self._qbytes is not None:
            out["qweight"] = self._qbytes
        q = self._qw
        if q is not None:
            for name in ("means", "norms", "_decoded", "_raw"):
                if getattr(q, name, None) is not None:
                    out[f"qm.{name}"] = getattr(q, name)
            for k, v in (q.payload or {}).items():
                vals = v.items() if isinstance(v, dict) else [("", v)]
                for kk, vv in vals:
                    if isinstance(vv, np.ndarray):
                        out[f"qm.payload.{k}.{kk}".rstrip(".")] = vv
            if q._bytes is not None:
                out["qm._bytes"] = np.frombuffer(q._bytes, dtype=np.uint8)
        if self.bias is not None:
            out["bias"] = self.bias
        if self._w_cache is not None:
            out["weight_cache"] = self._w_cache
        dev = getattr(self, "_w_device_cache", None)
        if dev is not None:
            out["weight_device_cache"] = dev[2]
        if self._rot_cache is not None:
            out["rotated_weight_cache"] = self._rot_cache[1]
        if self._triton_layout is not None:
            gl = self._triton_layout[2]
            for name in ("words", "meta", "tab", "row_scale", "row_offset"):
                t = getattr(gl, name, None)
                if t is not None:
                    out[f"gpu_layout.{name}"] = t
        return out

    @property
    def resident_nbytes(self) -> int:
        """Bytes of everything :meth:`resident_arrays` lists."""
        total = 0
        for v in self.resident_arrays().values():
            total += (v.numel() * v.element_size() if isinstance(v, torch.Tensor)
                      else v.nbytes)
        return int(total)

    def extra_repr(self) -> str:
        q = self._header
        act = "None" if self.act_rate is None else f"{self.act_rate:g}"
        held = "cpu layout" if self._layout is not None else "file"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={q.method!r}, rate={q.rate:g} -> "
                f"{self.weight_bits_per_entry:.3f} bit/entry, "
                f"{self._file_nbytes} bytes ({held}), "
                f"act_rate={act}, bias={self.bias is not None}")

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight ``W_hat`` (out x in), float32, decoded on each
        access and not kept: a fresh tensor that the module holds no
        reference to (writing into it changes nothing). Read-only: assigning
        to it raises. For code that reads ``.weight`` (tied embeddings,
        ``get_output_embeddings().weight``, PEFT); :meth:`forward` does not
        use it."""
        qw = self.quantized_weight
        kept = qw._decoded  # decoding must leave no rows cached behind
        try:
            W = qw.dequantize(np.float32)
        finally:
            qw._decoded = kept
        return torch.from_numpy(np.ascontiguousarray(W.T))

    def dequantized_weight(self) -> torch.Tensor:
        """The decoded weight ``W_hat`` (out x in), float32: cached when the
        layer holds a QuantizedMatrix, decoded afresh on each call (and not
        kept) when it holds a CPU layout."""
        if self._layout is not None:
            return torch.from_numpy(
                self.quantized_weight.dequantize(np.float32).T.copy())
        if self._w_cache is None:
            self._w_cache = torch.from_numpy(
                self._qw.dequantize(np.float32).T.copy())
        return self._w_cache

    def _weight_on(self, device) -> torch.Tensor:
        """:meth:`dequantized_weight` on ``device``, copied there once (not
        on every call) and cached beside the CPU copy."""
        W = self.dequantized_weight()
        if W.device == torch.device(device):
            return W
        cache = getattr(self, "_w_device_cache", None)
        if cache is None or cache[0] is not W or cache[1] != device:
            cache = self._w_device_cache = (W, device, W.to(device))
        return cache[2]

    # --------------------------------------------------------------- forward
    # (the forward backend is the instance attribute ``backend``, set in
    # __init__: see the class docstring)

    def _use_triton(self, x) -> bool:
        """Whether :meth:`forward` runs the fused kernel; raises when
        ``backend="triton"`` cannot run."""
        if self.backend not in ("auto", "torch", "triton", "numba"):
            raise ValueError("QuantLinear.backend must be 'auto', 'torch', "
                             f"'triton' or 'numba', got {self.backend!r}")
        q = self._header
        supported = (self.act_rate is None and q.method == "nested"
                     and q.mode == "fixed" and not q.dither)
        if self.backend == "auto":
            return (supported and x.device.type == "cuda"
                    and _backend.triton_usable())
        if self.backend in ("torch", "numba"):
            return False
        _backend.resolve("triton", tensor_input=True, device=x.device.type)
        if not supported:
            raise ValueError("backend='triton' needs float activations and a "
                             "nested fixed-mode weight without dither, got "
                             f"method={q.method!r}, mode={q.mode!r}, "
                             f"dither={q.dither}, act_rate={self.act_rate}")
        return True

    def _forward_triton(self, x2):
        """``x2 @ W_hat.T + bias`` by the fused kernel; the device layout of
        the weight is built on first use per device and cached."""
        from nqlib.kernels.gpu import matmul_triton

        cache = self._triton_layout
        if cache is None or cache[0] is not self._header or cache[1] != x2.device:
            layout = matmul_triton.gpu_layout(self.quantized_weight, x2.device)
            layout.source = None   # the rebuilt QuantizedMatrix is not kept
            cache = self._triton_layout = (self._header, x2.device, layout)
        return matmul_triton.quant_linear(x2, cache[2], self.bias)

    def _use_numba(self, x) -> bool:
        """Whether :meth:`forward` runs the fused CPU kernel (numba): for CPU
        inputs when the layer holds a CPU layout and ``backend`` is
        ``"auto"`` or ``"numba"``; raises when ``backend="numba"`` cannot
        run."""
        ok = self._layout is not None and x.device.type == "cpu"
        if self.backend == "numba" and not ok:
            why = (_cpu_layout.supports(self._header) if self._layout is None
                   else f"it runs on CPU tensors, got device {x.device}")
            raise ValueError(f"backend='numba' cannot run: {why}")
        return ok and self.backend in ("auto", "numba")

    def _forward_numba(self, x2):
        """``x2 @ W_hat.T + bias`` by the fused CPU kernel (float32)."""
        x = x2.detach().to(torch.float32).contiguous().numpy()
        bias = None if self.bias is None else self.bias.detach().float().numpy()
        return torch.from_numpy(self._layout.linear(x, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has last dimension {x.shape[-1]}, expected "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._use_triton(x2):  # fused decode-matmul, bias included
            y = self._forward_triton(x2)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if self.act_rate is None and self._use_numba(x2):  # bias included
            y = self._forward_numba(x2)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if self.act_rate is not None and self._use_numba(x2):
            y = self._forward_quantized_acts(x2, fused=True)  # bias included
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if self.act_rate is None:
            W = self._weight_on(x.device)
            y = x2.to(W.dtype) @ W.T
        else:
            y = self._forward_quantized_acts(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.device, y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _forward_quantized_acts(self, x2, fused=False):
        """``nqlib.matmul(quantize(x2.T), qweight)``, formed in float32.

        The activations are quantized once per input tensor (layers fed the
        same tensor, like an attention block's query, key and value, share
        the quantized copy) and the product is taken in the rotated domain
        -- the estimate of :func:`nqlib.matmul`, in float32 arithmetic. With
        ``fused`` (a layer held as a CPU layout, on CPU) the decoded
        activation rows meet the weight in the fused kernel and the bias is
        added; otherwise the product is taken against the cached, rescaled
        weight rows and the caller adds the bias.
        """
        q = self._header
        if x2.shape[0] == 0:
            y = torch.zeros(0, self.out_features, device=x2.device)
            return y + self.bias if fused and self.bias is not None else y
        QX = self.act_cache.quantized(x2, self.act_rate, q, self.act_mode)
        self._act_bytes = getattr(self, "_act_bytes", 0) + QX.nbytes
        self._act_entries = getattr(self, "_act_entries", 0) + x2.numel()
        if not _same_domain(QX, q):
            y = torch.from_numpy(matmul(QX, self.quantized_weight).astype(
                np.float32)).to(x2.device)
            return y + self.bias if fused and self.bias is not None else y
        if fused:
            # both operands' decoders removed the same directions (padding,
            # mean), so the raw weight rows meet the decoded activation rows
            # in the rotated domain; the mean term is n mu_x mu_w
            Xr = (QX._rows() * QX._row_scales()[:, None]).astype(np.float32)
            lay = self._layout
            xsum = (float(q.shape[0]) * QX.means.astype(np.float32)
                    if q.center else np.zeros(len(Xr), dtype=np.float32))
            bias = None if self.bias is None else self.bias.detach().float().numpy()
            return torch.from_numpy(lay.linear_rotated(Xr, xsum, bias))
        Wr, w_means = self._rotated_weight()
        Xr = torch.from_numpy(
            (QX._rows() * QX._row_scales()[:, None]).astype(np.float32))
        C = Xr @ Wr.T  # (batch, out)
        if q.center:
            x_means = torch.from_numpy(QX.means.astype(np.float32))
            C += float(q.shape[0]) * torch.outer(x_means, w_means)
        return C.to(x2.device)

    @property
    def act_bits_per_entry(self):
        """Achieved activation rate of the calls so far: ``8 * bytes /
        entries`` over every input quantized by :meth:`forward` (None before
        the first call, or without ``act_rate``)."""
        entries = self.act_entries
        return 8.0 * self._act_bytes / entries if entries else None

    @property
    def act_entries(self) -> int:
        """Number of input entries quantized by :meth:`forward` so far."""
        return getattr(self, "_act_entries", 0)

    def _rotated_weight(self):
        """Decoded weight rows in the coded (rotated) domain times their
        scales, float32 (out x n_pad), and the row means; cached."""
        cache = getattr(self, "_rot_cache", None)
        if cache is None or cache[0] is not self._header:
            # (a layer held as a CPU layout gets here only on other devices)
            q = self.quantized_weight
            Wr = torch.from_numpy(
                (q._rows() * q._row_scales()[:, None]).astype(np.float32))
            means = (torch.from_numpy(q.means.astype(np.float32)) if q.center
                     else None)
            cache = (self._header, Wr, means)
            self._rot_cache = cache
        return cache[1], cache[2]

    # ------------------------------------------------------ state dict I/O
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "qweight"
        if key in state_dict:
            data = state_dict[key]
            # the bytes of a QuantizedMatrix file, parsed by the reader that
            # checks every field (QuantizedMatrix.from_bytes); a corrupted
            # entry raises ValueError at once (not torch's collected
            # RuntimeError), like nqlib.load
            if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8
                    and data.ndim == 1):
                got = (f"dtype {data.dtype}, shape {tuple(data.shape)}"
                       if isinstance(data, torch.Tensor) else type(data).__name__)
                raise ValueError(f"{key}: corrupted entry: expected the file "
                                 f"bytes as a 1-D uint8 tensor, got {got}")
            try:
                qw = QuantizedMatrix.from_bytes(data.cpu().numpy().tobytes())
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            if qw.shape != (self.in_features, self.out_features):
                raise ValueError(f"{key}: quantized weight has shape {qw.shape}, "
                                 f"expected {(self.in_features, self.out_features)}")
            if self.act_rate is not None:
                try:  # the activation rate must suit the loaded weight's method
                    _matrix._check_rate(self.act_rate, qw.method)
                except ValueError as exc:
                    raise ValueError(f"{key}: the layer's act_rate does not suit "
                                     f"the loaded weight: {exc}") from None
            self._set_weight(qw, data)
            # qweight is not a registered buffer (the layer may hold the
            # layout alone): the default loader gets the other entries
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the exact bytes of the QuantizedMatrix file (rebuilt from the layout
        # when the layer holds one)
        destination[prefix + "qweight"] = self.qweight


# --------------------------------------------------------------- the model
@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did, layer by layer."""

    layers: list = field(default_factory=list)

    def add(self, name: str, layer: QuantLinear) -> None:
        """Append the row of the quantized layer ``layer`` named ``name``
        (its float weight counted as float32 before)."""
        out_f, in_f = layer.out_features, layer.in_features
        self.layers.append(dict(
            name=name, shape=(out_f, in_f), entries=out_f * in_f,
            bits_per_entry=layer.weight_bits_per_entry,
            bytes_before=4 * out_f * in_f, bytes_after=layer.weight_nbytes))

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
                   skip=(), *, mode: str | None = None,
                   act_mode: str | None = None, calibration=None,
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
    method : {"nested", "nested-ldlq", "rtn", "rtn-hadamard", "ecsq"}
        ``"nested-ldlq"`` needs ``calibration``.
    seed : int
    skip : iterable of str or callable
        Layer names (as in ``model.named_modules()``) to leave in float, or a
        predicate ``skip(name, module) -> bool``.
    mode, act_mode : {"fixed", "variable"}, optional
        Modes of the weight and activation quantizers, as in
        :meth:`QuantLinear.from_linear` (None: ``"fixed"`` weights and
        ``"variable"`` activations for the nested method, the method's own
        mode for the baselines).
    calibration : callable, iterable or dict, optional
        For ``method="nested-ldlq"``: calibration data, run through the
        (still float) model to measure each layer's input second moment (see
        :func:`calibration_hessians`): a callable ``calibration(model)``, or
        an iterable of batches, each called as ``model(batch)``; or the
        dict that :func:`calibration_hessians` returned (reused as is).
    progress : bool
        Show a progress bar over layers.
    **quantize_kwargs
        Passed on to :meth:`QuantLinear.from_linear`.

    Returns
    -------
    QuantizationReport
        Per layer: name, shape, bits/entry, bytes before (float32) and
        after.

    Raises
    ------
    ValueError
        ``model`` is not a module; ``method="nested-ldlq"`` without
        ``calibration``, or ``calibration`` with another method; an option
        that does not apply to ``method`` (as in
        :meth:`QuantLinear.from_linear`), checked before any calibration or
        quantization runs.

    Notes
    -----
    The replaced layers share one :class:`ActivationCache` (layers fed the
    same input quantize it once); it belongs to the model, not the process.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, torch.nn.Module):
        raise ValueError("model must be a torch.nn.Module")
    if (method == "nested-ldlq") != (calibration is not None):
        raise ValueError("calibration= is needed by, and only by, "
                         f"method='nested-ldlq' (got method={method!r}, "
                         f"calibration={'None' if calibration is None else 'given'})")
    _check_model_options(method, mode, act_rate, act_mode, quantize_kwargs)
    skip_fn = skip if callable(skip) else (lambda name, mod, s=set(skip): name in s)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not skip_fn(name, mod)]
    hessians = {}
    if isinstance(calibration, dict):
        missing = [name for name, _ in targets if name not in calibration]
        if missing:
            raise ValueError(f"calibration has no second moment for layer(s) "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
        hessians = calibration
    elif calibration is not None:
        hessians = calibration_hessians(model, calibration,
                                        layers=[name for name, _ in targets])
    report = QuantizationReport()
    for name, mod in tqdm(targets, desc="quantizing layers", disable=not progress):
        ql = QuantLinear.from_linear(mod, weight_rate, act_rate, seed,
                                     method=method, mode=mode, act_mode=act_mode,
                                     hessian=hessians.get(name), **quantize_kwargs)
        parent = model
        parts = name.split(".")
        for p in parts[:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], ql)
        report.add(name, ql)
    # one activation cache for the model's layers (q, k and v share inputs)
    _share_activation_cache(model)
    return report


def calibration_hessians(model: torch.nn.Module, calibration,
                         layers=None) -> dict:
    """Second moments ``H = E[x x^T]`` of the inputs of linear layers.

    Forward pre-hooks on the layers accumulate ``sum x x^T`` (float64) over
    every input row (token) while ``calibration`` runs the model without
    gradients; they are removed afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    calibration : callable or iterable
        ``calibration(model)``, or an iterable of batches, each called as
        ``model(batch)``.
    layers : list of str, optional
        Names (as in ``model.named_modules()``) of the ``nn.Linear`` layers to
        measure; all of them by default.

    Returns
    -------
    dict
        ``{name: ndarray (in_features, in_features)}``, the mean of
        ``x x^T`` over the rows the layer saw.

    Raises
    ------
    ValueError
        A name that is not an ``nn.Linear`` of ``model``, or a layer that the
        calibration never ran.
    """
    modules = dict(model.named_modules())
    names = ([n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
             if layers is None else list(layers))
    for name in names:
        if not isinstance(modules.get(name), torch.nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model")
    sums = {name: None for name in names}
    rows = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(
                "cpu", torch.float64)
            xtx = x.T @ x
            sums[name] = xtx if sums[name] is None else sums[name] + xtx
            rows[name] += x.shape[0]
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                for batch in calibration:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise ValueError(f"the calibration never ran layer(s) {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return {n: (sums[n] / rows[n]).numpy() for n in names}


class ActivationCache:
    """The last input that :class:`QuantLinear` layers quantized, one entry
    per thread.

    Layers fed the same tensor (an attention block's query, key and value)
    quantize it once: the first one quantizes it, the others find an equal
    input here. Quantization is deterministic, so an equal input gives the
    same result; inputs are compared by value (not by identity or version
    counter, which inference-mode tensors lack), which keeps in-place writes
    safe. Each thread has its own entry, so concurrent forward passes neither
    see nor evict each other's.

    A cache belongs to the layers that hold it (``QuantLinear.act_cache``):
    :func:`quantize_model` gives all the layers of a model one cache, a layer
    built alone gets its own, and nothing is shared across the process.
    Copies of a model (``copy.deepcopy``, pickling) start with an empty cache
    (still shared by the copied layers).
    """

    def __init__(self):
        self._local = threading.local()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()

    def clear(self) -> None:
        """Drop the calling thread's entry."""
        self._local.entry = None

    def quantized(self, x2, act_rate, qw, act_mode) -> QuantizedMatrix:
        """``quantize(x2.T, act_rate)`` with the weight's method and seed (and
        ``act_mode``, None for the method's default), reused when this
        thread's previous call saw an equal input with the same options."""
        method = qw.method
        mode = _matrix.OPTION_VALUES[method]["mode"][0] if act_mode is None \
            else act_mode
        key = (tuple(x2.shape), x2.dtype, x2.device, act_rate, method, mode,
               qw.seed)
        hit = getattr(self._local, "entry", None)
        if hit is not None and hit[0] == key and torch.equal(hit[1], x2.detach()):
            return hit[2]
        X = x2.detach().to("cpu", torch.float64).numpy()
        # keep_decoded: the MMSE step decodes the rows anyway; keeping them
        # saves decoding them again in the product (bit-identical to decoding
        # the bytes)
        QX = _matrix._quantize(X.T, act_rate, seed=qw.seed, method=method,
                               mode=mode, keep_decoded=True)
        self._local.entry = (key, x2.detach().clone(), QX)
        return QX


def _check_keywords(quantizer, kwargs, method) -> None:
    """Every key of ``kwargs`` must be a keyword-only option of
    ``quantizer`` (``nqlib.quantize`` or ``quantize_ldlq``)."""
    import inspect

    params = inspect.signature(quantizer).parameters
    options = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
    for key in kwargs:
        if key not in options:
            raise ValueError(f"{key}= does not apply to method={method!r}: "
                             f"{quantizer.__name__} has no such option (it "
                             f"has {', '.join(options)})")


def _check_model_options(method, mode, act_rate, act_mode, kwargs) -> None:
    """The options of :func:`quantize_model`, checked as
    :meth:`QuantLinear.from_linear` checks them, before any layer is
    touched."""
    from nqlib.quantizers.ldlq import quantize_ldlq

    ldlq = method == "nested-ldlq"
    base = "nested" if ldlq else method
    if base not in _matrix.METHODS:
        raise ValueError("method must be one of "
                         f"{('nested-ldlq',) + _matrix.METHODS}, got {method!r}")
    if ldlq and mode not in (None, "fixed", "trellis"):
        raise ValueError("method='nested-ldlq' codes the fixed or the trellis "
                         f"mode, got mode={mode!r}")
    if ldlq and mode == "trellis":
        from nqlib.quantizers.trellis import quantize_ldlq
    if act_rate is None and act_mode is not None:
        raise ValueError(f"act_mode={act_mode!r} does not apply without act_rate "
                         "(the activations stay in float)")
    _check_keywords(quantize_ldlq if ldlq else quantize, kwargs, method)
    options = {k: v for k, v in kwargs.items()
               if k in _matrix.OPTION_VALUES[base]}
    _matrix._resolve_options(base, mode=mode, **options)
    if act_rate is not None:
        _matrix._check_rate(act_rate, base)
        _check_act_mode(act_mode, base)


def _check_act_mode(act_mode, method) -> None:
    """``act_mode`` must be a mode that the activation quantizer (the
    weight's method) implements; not ``"trellis"``, whose Viterbi encoder
    is for weights (quantized once, offline), not per-call activations."""
    if act_mode == "trellis":
        raise ValueError("act_mode='trellis' does not apply: the trellis "
                         "encoder is a Viterbi search, too slow for "
                         "activations quantized at every call; use 'variable' "
                         "or 'fixed'")
    try:
        _matrix._resolve_options(method, mode=act_mode)
    except ValueError as exc:
        msg = str(exc).replace("mode=", "act_mode=")
        raise ValueError(msg.replace("mode must", "act_mode must")) from None


def _share_activation_cache(model: torch.nn.Module) -> ActivationCache:
    """Give every :class:`QuantLinear` of ``model`` one activation cache (a
    new one) and return it."""
    cache = ActivationCache()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.act_cache = cache
    return cache
