"""The activation quantizer of :class:`~nqlib.nn.QuantLinear` and its cache.

A :class:`~nqlib.nn.QuantLinear` built with ``act_rate`` quantizes its input
on every call, with the weight's method and seed, so that both operands
share the rotation and their product is formed in the rotated domain. The
quantized input is kept in an :class:`ActivationCache`: layers fed the same
tensor (an attention block's query, key and value) quantize it once.

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from nqlib.quantizers.matrix import (
    FixedRowsQuantizer,
    QuantizedMatrix,
    quantize_columns,
)
from nqlib.quantizers.rate_control import OPTION_VALUES, resolve_options

__all__ = ["ActivationCache", "check_act_mode", "default_act_mode"]


def default_act_mode(method: str) -> str:
    """The mode the activation quantizer uses for ``method`` when
    ``act_mode`` is None: the method's default mode (``"variable"`` for the
    nested method)."""
    return OPTION_VALUES[method]["mode"][0]


def check_act_mode(act_mode, method: str) -> None:
    """Check that ``act_mode`` is a mode the activation quantizer (the
    weight's ``method``) implements.

    Parameters
    ----------
    act_mode : str or None
        None stands for :func:`default_act_mode`.
    method : str
        The weight's method (``"nested"`` for ``"nested-ldlq"``).

    Raises
    ------
    ValueError
        ``act_mode="trellis"`` (its Viterbi encoder is for weights,
        quantized once offline, not for activations quantized at every
        call), or a mode ``method`` does not have.
    """
    if act_mode == "trellis":
        raise ValueError("act_mode='trellis' does not apply: the trellis "
                         "encoder is a Viterbi search, too slow for "
                         "activations quantized at every call; use 'variable' "
                         "or 'fixed'")
    try:
        resolve_options(method, mode=act_mode)
    except ValueError as exc:
        msg = str(exc).replace("mode=", "act_mode=")
        raise ValueError(msg.replace("mode must", "act_mode must")) from None


class ActivationCache:
    """The last input that :class:`~nqlib.nn.QuantLinear` layers quantized,
    one entry per thread.

    Layers fed the same tensor (an attention block's query, key and value)
    quantize it once: the first one quantizes it, the others find an equal
    input here. Quantization is deterministic, so an equal input gives the
    same result; inputs are compared by value (not by identity or version
    counter, which inference-mode tensors lack), which keeps in-place writes
    safe. Each thread has its own entry, so concurrent forward passes neither
    see nor evict each other's.

    A cache belongs to the layers that hold it (``QuantLinear.act_cache``):
    :func:`~nqlib.nn.quantize_model` gives all the layers of a model one
    cache, a layer built alone gets its own, and nothing is shared across
    the process. Copies of a model (``copy.deepcopy``, pickling) start with
    an empty cache (still shared by the copied layers) and zero counts.

    Attributes
    ----------
    quantized_calls : int
        Inputs this cache quantized (the look-ups that found no equal
        input), over all threads, since it was made or
        :meth:`reset_counts` was called.
    quantized_entries : int
        Entries of those inputs.
    """

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._coders = {}        # (rate, seed) -> FixedRowsQuantizer
        self.quantized_calls = 0
        self.quantized_entries = 0

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def clear(self) -> None:
        """Drop the calling thread's entry."""
        self._local.entry = None

    def reset_counts(self) -> None:
        """Set :attr:`quantized_calls` and :attr:`quantized_entries` to 0."""
        with self._lock:
            self.quantized_calls = 0
            self.quantized_entries = 0

    def quantized(self, x2: torch.Tensor, act_rate: float, qw: QuantizedMatrix,
                  act_mode: str | None) -> QuantizedMatrix:
        """``quantize(x2.T, act_rate)`` with the weight's method and seed.

        Parameters
        ----------
        x2 : torch.Tensor, shape (tokens, in_features)
            The layer's input rows (the quantized vectors).
        act_rate : float
            Activation rate in bits per entry.
        qw : QuantizedMatrix
            The weight (its method and seed are used).
        act_mode : str or None
            Mode of the activation quantizer (None: :func:`default_act_mode`).

        Returns
        -------
        QuantizedMatrix
            ``x2.T`` quantized, its decoded rows kept; reused when this
            thread's previous call saw an equal input with the same options.
        """
        method = qw.method
        mode = default_act_mode(method) if act_mode is None else act_mode
        key = (tuple(x2.shape), x2.dtype, x2.device, act_rate, method, mode,
               qw.seed)
        hit = getattr(self._local, "entry", None)
        if hit is not None and hit[0] == key and torch.equal(hit[1], x2.detach()):
            return hit[2]
        # float32 inputs stay float32 (the quantizer reads them as float64,
        # the same values); other dtypes become float64 (bfloat16 and float16
        # exactly, like float32)
        xd = x2.detach().to("cpu")
        X = (xd if xd.dtype == torch.float32 else xd.to(torch.float64)).numpy()
        # the previous entry's float32 rows are free to be written again
        rows = [hit[3][0] if hit is not None else None, False]
        # keep_decoded: the MMSE step decodes the rows anyway; keeping them
        # saves decoding them again in the product (bit-identical to decoding
        # the bytes)
        coder = None
        if method == "nested" and mode == "fixed":
            # the same bits through the lean path of rows quantized on every
            # call (the rotation, plan and codes of a shape worked out once),
            # which also writes the float32 rows of rows_float32
            coder = self._coders.get((act_rate, qw.seed))
            if coder is None:
                coder = FixedRowsQuantizer(act_rate, qw.seed)
                with self._lock:
                    self._coders[act_rate, qw.seed] = coder
            buf = rows[0]
            if buf is None or buf.shape != X.shape:
                buf = np.empty(X.shape, dtype=np.float32)
            QX = coder.code(X, rows32=buf)
            if QX is not None:
                rows[:] = [buf, True]
            else:
                QX = coder(X)       # the general function: its result or error
        else:
            QX = quantize_columns(X.T, act_rate, seed=qw.seed, method=method,
                                  mode=mode, keep_decoded=True)
        with self._lock:
            self.quantized_calls += 1
            self.quantized_entries += X.size
        self._local.entry = (key, x2.detach().clone(), QX, rows, coder)
        return QX

    def nbytes(self, QX: QuantizedMatrix) -> int:
        """``QX.nbytes``, the bytes of the quantized input's file (what
        :attr:`QuantLinear.act_bits_per_entry` counts), without serialising
        it again when this thread's last :meth:`quantized` call made ``QX``
        in the fixed mode, whose file length depends on the shape alone."""
        hit = getattr(self._local, "entry", None)
        if hit is not None and hit[2] is QX and hit[4] is not None:
            return hit[4].nbytes(QX)
        return QX.nbytes

    def rows_float32(self, QX: QuantizedMatrix) -> np.ndarray:
        """``QX.coded_rows() * QX.row_scales()[:, None]`` in float32 (the
        decoded activation rows as the fused CPU kernel takes them), for the
        ``QX`` that this thread's last :meth:`quantized` call returned:
        computed once for the layers that share the input, in an array that
        the next quantized input of this thread reuses (it must not be kept
        beyond the forward pass)."""
        from nqlib.kernels.cpu.coded import scaled_rows_float32

        hit = getattr(self._local, "entry", None)
        if hit is None or hit[2] is not QX:
            raise ValueError("rows_float32 takes the quantized input that this "
                             "thread's last quantized() call returned")
        rows = hit[3]
        Y = QX.coded_rows()
        if not rows[1]:
            buf = rows[0]
            if buf is None or buf.shape != Y.shape:
                buf = np.empty(Y.shape, dtype=np.float32)
            scaled_rows_float32(Y, np.ascontiguousarray(QX.row_scales()), buf)
            rows[:] = [buf, True]
        return rows[0]
