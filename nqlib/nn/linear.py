"""torch modules whose weight is stored as nqlib codes.

* :class:`QuantLinear` stores the weight ``W`` (out x in) of a linear layer
  as a :class:`nqlib.QuantizedMatrix` of ``W.T``: the rows of ``W`` are the
  quantized vectors, so every output is an inner product between an
  activation row and a quantized weight row -- the setting of the book.
  Optionally the activations are quantized on the fly too (``act_rate``,
  :mod:`nqlib.nn.activations`), with the same seed, so both operands share
  the rotation and the product is formed in the rotated domain.
* :class:`QuantEmbedding` is an embedding table tied to a quantized output
  layer: it reads its rows from the layer's codes.

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from nqlib import _backend
from nqlib.matmul import inner_products, same_domain
from nqlib.nn.activations import ActivationCache, check_act_mode
from nqlib.nn.options import LDLQ_METHOD, check_keywords, weight_quantizer
from nqlib.quantizers import cpu_layout as _cpu_layout
from nqlib.quantizers import trellis_layout as _trellis_layout
from nqlib.quantizers.matrix import QuantizedMatrix
from nqlib.quantizers.rate_control import check_rate

__all__ = ["QuantLinear", "QuantEmbedding"]


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
        as the weight; for the rtn baselines the integer bit width). It is
        the rate of the stream of inputs (``quantize_columns(...,
        stream=True)``): each call's codes, means, norms and per-call fields
        count, not the configuration that every call shares.
    act_mode : {"variable", "fixed"}, optional
        Mode of the activation quantizer, as ``mode`` of
        :func:`nqlib.quantize` for the weight's method (None: that method's
        default, ``"variable"`` for the nested one). Only with ``act_rate``.
        For one token per call (generation) ``"fixed"`` keeps more of the
        rate for the codes: a variable-mode call also sends its entropy
        coder's parameters (28 bytes, 0.39 bit per entry at 576).
    act_cache : ActivationCache, optional
        Where the last quantized input is kept, so that layers fed the same
        tensor quantize it once; :func:`quantize_model` gives all the layers
        of a model one cache. By default the layer gets its own.

    Attributes
    ----------
    backend : {"auto", "numba", "torch", "triton"}
        Forward backend of this layer (an instance attribute; set it per
        layer). ``"auto"``: for CPU inputs the fused numba decode-matmul
        (:mod:`nqlib.kernels.cpu.fused`, or
        :mod:`nqlib.kernels.cpu.trellis_fused` for a trellis weight) when the
        layer holds a CPU layout (below), with float or quantized
        activations; for CUDA inputs the
        fused Triton decode-matmul (:mod:`nqlib.kernels.gpu.matmul_triton`,
        or :mod:`nqlib.kernels.gpu.trellis_triton`) when the weight is a
        nested fixed-mode matrix without dither or a trellis-mode matrix and
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
    dict rebuild from it. A trellis-mode weight is held the same way, as
    its packed stream and side information
    (:mod:`nqlib.quantizers.trellis_layout`: the file's stream, 8 bytes of
    padding).
    On CPU the forward pass runs the fused kernel on either layout
    (:mod:`nqlib.kernels.cpu.fused`, :mod:`nqlib.kernels.cpu.trellis_fused`)
    for any batch shape, also with quantized activations (the decoded
    activation rows meet the weight in the rotated domain).
    :attr:`resident_nbytes` counts what the layer keeps. Other weights are
    held as their QuantizedMatrix; on CPU the forward pass decodes them once
    (numba) and caches the dequantized float32 matrix, and with activation
    quantization it runs :func:`nqlib.inner_products` on the two quantized
    operands. The output has the input's dtype (bfloat16 and float16 inputs
    included; the arithmetic is float32). A layer may be called from
    several threads at once. On CPU, the rotated input rows (and, with
    ``act_rate``, the coded rows of the activation quantizer) go to
    per-thread scratch buffers that are kept for the next call, so that
    their memory is not mapped afresh each time;
    :func:`nqlib.release_scratch` frees them.
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
            act_rate = check_rate(act_rate, qweight.method)
            check_act_mode(act_mode, qweight.method)
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
        """Hold ``qweight``: as its CPU layout alone when a fused kernel
        takes it (nested, fixed mode, no dither, ``q <= 16``; or nested,
        trellis mode), else as the QuantizedMatrix and its bytes (``data``,
        a uint8 tensor, when given)."""
        self._w_cache = None
        self._triton_layout = None
        self._bound = None
        self._rot_cache = None
        self._qw_ref = None
        self._file_nbytes = qweight.nbytes
        layout = _host_layout(qweight)
        if layout is not None:
            # the packed layout and the file's side information only: the
            # codes are not kept twice and no float weight is kept at all;
            # the file's bytes are rebuilt from the layout when asked for
            self._layout = layout
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
        if method == LDLQ_METHOD:
            if hessian is None:
                raise ValueError("method='nested-ldlq' needs hessian= (the "
                                 "second moment of the layer's inputs)")
            quantize_ldlq = weight_quantizer(method, mode)
            check_keywords(quantize_ldlq, quantize_kwargs, method)
            qw = quantize_ldlq(W.T, weight_rate, hessian, seed=seed,
                               **quantize_kwargs)
        elif hessian is not None:
            raise ValueError(f"hessian= is used by method='nested-ldlq' only, "
                             f"got method={method!r}")
        else:
            if mode is None and method == "nested":
                mode = "fixed"  # random access: the default for weights
            quantize = weight_quantizer(method, mode)
            check_keywords(quantize, quantize_kwargs, method)
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
        state["_bound"] = None           # a closure over this layer's arrays
        return state

    @property
    def qweight(self) -> torch.Tensor:
        """The bytes of the weight's QuantizedMatrix (uint8), the state
        dict's ``qweight`` entry; rebuilt from the layout on each access when
        the layer holds one (serialised from the rebuilt matrix that
        :attr:`quantized_weight` gave while a caller still holds it: the same
        bytes, without decoding the layout again)."""
        if self._qbytes is not None:
            return self._qbytes
        held = self._qw_ref() if self._qw_ref is not None else None
        data = (held if held is not None else self._layout).to_bytes()
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())

    @property
    def cpu_layout(self):
        """The layout the fused CPU kernel reads -- a
        :class:`~nqlib.quantizers.cpu_layout.CpuLayout` (fixed mode) or a
        :class:`~nqlib.quantizers.trellis_layout.TrellisLayout` (trellis
        mode) --, or None when the weight is held as a QuantizedMatrix
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
        if self._qw is not None:  # codes, side information, cached bytes and rows
            out.update({f"qm.{k}": v for k, v in self._qw.resident_arrays().items()})
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
            for name in ("words", "meta", "tab", "row_scale", "row_offset",
                         "data", "table", "scale", "means"):
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
        access (copied when :meth:`dequantized_weight` has cached it) and
        not kept: a fresh tensor that the module holds no reference to
        (writing into it changes nothing), and no decoded rows are left
        cached behind, on the layer or on a :attr:`quantized_weight` a
        caller holds. Read-only: assigning to it raises. For code that reads
        ``.weight`` (tied embeddings, ``get_output_embeddings().weight``,
        PEFT); :meth:`forward` does not use it."""
        if self._w_cache is not None:  # the same decode, already at hand
            return self._w_cache.clone()
        # decoded from a copy that nobody keeps, so that no decoded rows are
        # left cached behind (on the layer's matrix, or on the one that
        # quantized_weight gave a caller)
        qw = (self._layout.to_quantized() if self._layout is not None
              else QuantizedMatrix.from_bytes(self._qw.to_bytes()))
        W = qw.dequantize(np.float32)
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
                     and ((q.mode == "fixed" and not q.dither)
                          or q.mode == "trellis"))
        if self.backend == "auto":
            return (supported and x.device.type == "cuda"
                    and _backend.triton_usable())
        if self.backend in ("torch", "numba"):
            return False
        _backend.resolve("triton", tensor_input=True, device=x.device.type)
        if not supported:
            raise ValueError("backend='triton' needs float activations and a "
                             "nested fixed-mode weight without dither or a "
                             "trellis-mode weight, got "
                             f"method={q.method!r}, mode={q.mode!r}, "
                             f"dither={q.dither}, act_rate={self.act_rate}")
        return True

    def _forward_triton(self, x2):
        """``x2 @ W_hat.T + bias`` by the fused kernel
        (:mod:`nqlib.kernels.gpu.matmul_triton`, or
        :mod:`nqlib.kernels.gpu.trellis_triton` for a trellis weight); the
        device layout of the weight is built on first use per device and
        cached."""
        from nqlib.kernels.gpu import matmul_triton, trellis_triton
        from nqlib.quantizers.fixed_layout import gpu_layout

        trellis = self._header.mode == "trellis"
        cache = self._triton_layout
        if cache is None or cache[0] is not self._header or cache[1] != x2.device:
            # device tensors only: the rebuilt QuantizedMatrix is not kept
            layout = (self._layout.gpu_layout(x2.device) if trellis
                      else gpu_layout(self.quantized_weight, x2.device))
            cache = self._triton_layout = (self._header, x2.device, layout)
        if trellis:
            return trellis_triton.quant_linear(x2, cache[2], self.bias)
        return matmul_triton.quant_linear(x2, cache[2], self.bias)

    def _use_numba(self, x) -> bool:
        """Whether :meth:`forward` runs the fused CPU kernel (numba): for CPU
        inputs when the layer holds a CPU layout and ``backend`` is
        ``"auto"`` or ``"numba"``; raises when ``backend="numba"`` cannot
        run."""
        if self.backend == "numba" and (self._layout is None
                                        or x.device.type != "cpu"):
            why = (f"{_cpu_layout.supports(self._header)}; "
                   f"{_trellis_layout.supports(self._header)}"
                   if self._layout is None
                   else f"it runs on CPU tensors, got device {x.device}")
            raise ValueError(f"backend='numba' cannot run: {why}")
        return self._numba_takes(x)

    def _numba_takes(self, x) -> bool:
        """:meth:`_use_numba` without its error: a CPU input, a CPU layout,
        ``backend`` ``"auto"`` or ``"numba"`` (cheap: batch-1 calls are
        short)."""
        return (self._layout is not None and x.is_cpu
                and self.backend in ("auto", "numba"))

    def _forward_numba(self, x):
        """``x @ W_hat.T + bias`` by the fused CPU kernel, for inputs of any
        leading shape: float32 arithmetic, the output in ``x``'s dtype."""
        xf = x.detach() if x.requires_grad else x
        if xf.dtype != torch.float32 or not xf.is_contiguous():
            xf = xf.to(torch.float32).contiguous()
        # the output in torch's own (cache-line aligned) memory, in its final
        # shape; both arrays are built here, so the bound kernel call skips
        # the checks (numpy reshapes them to rows: views, cheaper than torch's)
        lead = x.shape[:-1]
        out = torch.empty((*lead, self.out_features), dtype=torch.float32)
        if len(lead) == 1:
            self._bound_linear()(xf.numpy(), out.numpy())
        else:
            self._bound_linear()(xf.numpy().reshape(-1, self.in_features),
                                 out.numpy().reshape(-1, self.out_features))
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _bound_linear(self, name="linear"):
        """The layout's kernel call ``bound_<name>`` (``"linear"``:
        :meth:`~nqlib.quantizers.layout_common.RotatedLayout.bound_linear`;
        ``"linear_rotated"``: its form for activations in the coded domain)
        with its arguments bound, kept while the layout and the bias stay
        the same: the same bias object over the same float32 memory (then
        the kernel reads the bias's memory itself, so in-place writes to it
        are seen). A bias of another dtype is converted at every call."""
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            return getattr(self._layout, "bound_" + name)(
                bias.detach().float().numpy())
        ptr = None if bias is None else bias.data_ptr()
        held = self._bound
        if (held is None or held[0] is not self._layout or held[1] is not bias
                or held[2] != ptr):
            held = self._bound = (self._layout, bias, ptr, {})
        fn = held[3].get(name)
        if fn is None:
            b = None if bias is None else bias.detach().numpy()
            fn = held[3][name] = getattr(self._layout, "bound_" + name)(b)
        return fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has last dimension {x.shape[-1]}, expected "
                             f"{self.in_features}")
        if self._numba_takes(x):
            # the fused CPU kernel, bias included (_use_triton is False here)
            if self.act_rate is None:
                return self._forward_numba(x)
            y = self._forward_fused_acts(x)
            if y is not None:
                return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._use_triton(x2):  # fused decode-matmul, bias included
            y = self._forward_triton(x2)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        # float inputs that the fused CPU kernel takes went above: this
        # raises for backend='numba' that cannot run, and is True only with
        # act_rate
        if self._use_numba(x2):
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

    def _forward_fused_acts(self, x):
        """``forward`` of a layer with ``act_rate`` by the fused CPU kernel
        when the activation cache's lean fixed-mode path takes ``x``
        (:meth:`~nqlib.nn.ActivationCache.fused_operand`: the same
        quantization as :meth:`_forward_quantized_acts`, without building
        the quantized matrix): the decoded activation rows meet the raw
        weight rows in the rotated domain, bias included. None when that
        path does not apply."""
        lead = x.shape[:-1]
        x2 = x if len(lead) == 1 else x.reshape(-1, self.in_features)
        got = self.act_cache.fused_operand(x2, self.act_rate, self._header,
                                           self.act_mode)
        if got is None:
            return None
        rows, xsum, nbytes = got
        self._count_acts(nbytes, rows.size)
        out = torch.empty((*lead, self.out_features), dtype=torch.float32)
        o = out.numpy()
        self._bound_linear("linear_rotated")(
            rows, xsum, o if len(lead) == 1 else o.reshape(-1, self.out_features))
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _count_acts(self, nbytes, entries) -> None:
        """Add a quantized input's stream bytes and entries to the layer's
        activation counts ([bytes, entries], updated in place: cheaper than
        setting a module's attributes at every call)."""
        counts = self.__dict__.get("_act_counts")
        if counts is None:
            counts = self.__dict__["_act_counts"] = [0, 0]
        counts[0] += nbytes
        counts[1] += entries

    def _forward_quantized_acts(self, x2, fused=False):
        """``nqlib.inner_products(quantize_columns(x2.T, stream=True), qweight)``,
        formed in float32.

        The activations are quantized once per input tensor (layers fed the
        same tensor, like an attention block's query, key and value, share
        the quantized copy) and the product is taken in the rotated domain
        -- the estimate of :func:`nqlib.inner_products`, in float32 arithmetic. With
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
        self._count_acts(QX.stream_nbytes, x2.numel())
        if not same_domain(QX, q):
            y = torch.from_numpy(inner_products(QX, self.quantized_weight).astype(
                np.float32)).to(x2.device)
            return y + self.bias if fused and self.bias is not None else y
        if fused:
            # both operands' decoders removed the same directions (padding,
            # mean), so the raw weight rows meet the decoded activation rows
            # in the rotated domain; the mean term is n mu_x mu_w
            # (the float32 rows are computed once for the layers that share
            # this input, in the cache's reused array)
            Xr = self.act_cache.rows_float32(QX)
            xsum = (np.float32(q.shape[0]) * QX.means if q.center
                    else np.zeros(len(Xr), dtype=np.float32))
            out = torch.empty((len(Xr), self.out_features), dtype=torch.float32)
            self._bound_linear("linear_rotated")(Xr, xsum, out.numpy())
            return out
        Wr, w_means = self._rotated_weight()
        # the same float32 rows as the fused path (used here, not kept)
        Xr = torch.from_numpy(self.act_cache.rows_float32(QX))
        C = Xr @ Wr.T  # (batch, out)
        if q.center:
            x_means = torch.from_numpy(QX.means.astype(np.float32))
            C += float(q.shape[0]) * torch.outer(x_means, w_means)
        return C.to(x2.device)

    @property
    def act_bits_per_entry(self):
        """Achieved activation rate of the calls so far: ``8 * bytes /
        entries`` over every input quantized by :meth:`forward`, each
        input's bytes those it costs as one call of the stream
        (:attr:`nqlib.QuantizedMatrix.stream_nbytes`; None before the first
        call, or without ``act_rate``)."""
        counts = self.__dict__.get("_act_counts") or [0, 0]
        return 8.0 * counts[0] / counts[1] if counts[1] else None

    @property
    def act_entries(self) -> int:
        """Number of input entries quantized by :meth:`forward` so far."""
        return (self.__dict__.get("_act_counts") or [0, 0])[1]

    def _rotated_weight(self):
        """Decoded weight rows in the coded (rotated) domain times their
        scales, float32 (out x n_pad), and the row means; cached."""
        cache = getattr(self, "_rot_cache", None)
        if cache is None or cache[0] is not self._header:
            # (a layer held as a CPU layout gets here only on other devices)
            q = self.quantized_weight
            Wr = torch.from_numpy(
                (q.coded_rows() * q.row_scales()[:, None]).astype(np.float32))
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
                    check_rate(self.act_rate, qw.method)
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


def _host_layout(qweight):
    """The layout a fused CPU kernel reads for ``qweight`` (a fixed-mode
    :class:`~nqlib.quantizers.cpu_layout.CpuLayout` or a trellis-mode
    :class:`~nqlib.quantizers.trellis_layout.TrellisLayout`), or None when
    neither holds it."""
    if _cpu_layout.supports(qweight) is None:
        return _cpu_layout.cpu_layout(qweight)
    if _trellis_layout.supports(qweight) is None:
        return _trellis_layout.trellis_layout(qweight)
    return None


class QuantEmbedding(torch.nn.Module):
    """An embedding table tied to a quantized output layer.

    Language models often tie the token embedding to the output projection
    (the LM head): one ``vocab x dim`` matrix serves both. When
    :func:`quantize_` quantizes such a head, the embedding reads its rows
    from the same codes, so the matrix is stored once, quantized.

    The table is not a registered submodule or buffer (the head owns it):
    the state dict of this module is empty, and :func:`save_quantized`
    records the tie instead.

    Parameters
    ----------
    source : nqlib.nn.QuantLinear
        The quantized head, weight ``(num_embeddings, embedding_dim)``.
    padding_idx : int or None
        As in ``torch.nn.Embedding`` (only recorded: no gradient flows).

    Notes
    -----
    Each call decodes the whole table (:attr:`QuantLinear.weight`) and
    keeps nothing; a look-up that decodes only the requested rows is not
    implemented.
    """

    def __init__(self, source, padding_idx=None):
        super().__init__()
        if not isinstance(source, QuantLinear):
            raise TypeError(f"source must be a QuantLinear, got "
                            f"{type(source).__name__}")
        object.__setattr__(self, "_source", source)  # not a submodule
        self.num_embeddings = source.out_features
        self.embedding_dim = source.in_features
        self.padding_idx = padding_idx

    @property
    def source(self):
        """The quantized layer that owns the table."""
        return self._source

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (num_embeddings x embedding_dim), float32,
        decoded on each access."""
        return self._source.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight.to(self._device()),
                                             self.padding_idx)

    def _device(self):
        b = next(iter(self._source.buffers()), None)
        return b.device if b is not None else torch.device("cpu")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"tied to a QuantLinear")
