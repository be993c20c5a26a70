"""The activation quantizer of :class:`~nqlib.nn.QuantLinear` and its cache.

A :class:`~nqlib.nn.QuantLinear` built with ``act_rate`` quantizes its input
on every call, with the weight's method and seed, so that both operands
share the rotation and their product is formed in the rotated domain.
``act_rate`` is the rate of the stream of inputs (``quantize_columns(...,
stream=True)``): each call's codes, means, norms and per-call fields count,
the stream's configuration (the file's header, the fixed mode's code
parameters) is sent once, so one token gets as fine a code as a batch. The
quantized input is kept in an :class:`ActivationCache`: layers fed the same
tensor (an attention block's query, key and value) quantize it once.

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from nqlib.matmul import same_domain
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

    The fused CPU product of a layer asks for :meth:`fused_operand` (the
    decoded rows in float32 and the mean term), which for the fixed mode
    codes the input without building the :class:`~nqlib.QuantizedMatrix`;
    :meth:`quantized` builds it from the same code when asked for it.

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
        self._lean = {}          # see _lean_coder
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

    def _key(self, x2, act_rate, qw, act_mode):
        """``(key, method, mode)``: what an equal input must also share to
        reuse this thread's entry."""
        method = qw.method
        mode = default_act_mode(method) if act_mode is None else act_mode
        return ((tuple(x2.shape), x2.dtype, x2.device, act_rate, method, mode,
                 qw.seed), method, mode)

    def _hit(self, key, x2):
        """This thread's entry when it holds an equal input under ``key``,
        else None."""
        entry = getattr(self._local, "entry", None)
        if (entry is not None and entry.key == key
                and torch.equal(entry.x, x2.detach())):
            return entry
        return None

    def _coder(self, act_rate, seed) -> FixedRowsQuantizer:
        """The fixed-mode quantizer of rows for ``(act_rate, seed)``, made
        once and shared by the threads."""
        coder = self._coders.get((act_rate, seed))
        if coder is None:
            coder = FixedRowsQuantizer(act_rate, seed, stream=True)
            with self._lock:
                self._coders[act_rate, seed] = coder
        return coder

    def _count(self, entries: int) -> None:
        with self._lock:
            self.quantized_calls += 1
            self.quantized_entries += entries

    @staticmethod
    def _free_rows(previous):
        """The float32 rows array of the entry being replaced (its rows, or
        the spare it had not written yet), free to be written again; None
        when it had none."""
        if previous is None:
            return None
        return previous.rows if previous.rows is not None else previous.spare

    @staticmethod
    def _rows_buffer(buf, shape):
        """``buf`` (a float32 rows array free to be written, or None) when
        it has ``shape``, else a new array."""
        if buf is None or buf.shape != shape:
            buf = np.empty(shape, dtype=np.float32)
        return buf

    def quantized(self, x2: torch.Tensor, act_rate: float, qw: QuantizedMatrix,
                  act_mode: str | None) -> QuantizedMatrix:
        """``quantize_columns(x2.T, act_rate, stream=True)`` with the
        weight's method and seed (the rate of the layer's stream of inputs).

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
        key, method, mode = self._key(x2, act_rate, qw, act_mode)
        entry = self._hit(key, x2)
        if entry is not None:
            if entry.qm is None:      # made by fused_operand: built now
                entry.qm = entry.coder.matrix(entry.run)
            return entry.qm
        previous = getattr(self._local, "entry", None)
        # float32 inputs stay float32 (the quantizer reads them as float64,
        # the same values); other dtypes become float64 (bfloat16 and float16
        # exactly, like float32)
        xd = x2.detach().to("cpu")
        X = (xd if xd.dtype == torch.float32 else xd.to(torch.float64)).numpy()
        # keep_decoded: the MMSE step decodes the rows anyway; keeping them
        # saves decoding them again in the product (bit-identical to decoding
        # the bytes)
        coder = rows = None
        spare = self._free_rows(previous)
        if method == "nested" and mode == "fixed":
            # the same bits through the lean path of rows quantized on every
            # call (the rotation, plan and codes of a shape worked out once),
            # which also writes the float32 rows of rows_float32
            coder = self._coder(act_rate, qw.seed)
            buf = self._rows_buffer(spare, X.shape)
            QX = coder.code(X, rows32=buf)
            if QX is not None:
                rows, spare = buf, None
            else:
                QX = coder(X)       # the general function: its result or error
        else:
            QX = quantize_columns(X.T, act_rate, seed=qw.seed, method=method,
                                  mode=mode, keep_decoded=True, stream=True)
        self._count(X.size)
        self._local.entry = _Entry(key, x2.detach().clone(), QX, coder,
                                   None, rows, None, spare)
        return QX

    def fused_operand(self, x2: torch.Tensor, act_rate: float,
                      qw: QuantizedMatrix, act_mode: str | None):
        """The quantized input ``x2`` as the fused CPU product takes it, for
        a weight ``qw`` coded in the same domain: ``(rows, xsum, nbytes)``
        -- the decoded rows times their row scales in float32 (what
        :meth:`rows_float32` returns), ``n`` times the rows' means in
        float32 (zeros when not centred), and the bytes the quantized input
        costs as one call of the layer's stream of inputs (its matrix's
        :attr:`~nqlib.QuantizedMatrix.stream_nbytes`). None when this path
        does not apply (another mode, an input the lean fixed-mode path
        does not take, another coded domain); then :meth:`quantized`
        gives the matrix (or its error).

        The same quantization as :meth:`quantized` (the same bits, the same
        counts, the same entry: a later :meth:`quantized` call with an
        equal input returns the matrix of this one), without building the
        :class:`~nqlib.QuantizedMatrix` unless a caller asks for it: at
        batch 1 that object, not the arithmetic, is most of the time.
        The rows are this thread's, valid until its next quantized input.
        """
        key = self._key(x2, act_rate, qw, act_mode)[0]
        entry = self._hit(key, x2)
        if entry is None:
            coder = self._lean_coder(qw, act_rate, act_mode, x2.shape[-1])
            if coder is None:
                return None
            xd = x2.detach()
            X = (xd if xd.dtype == torch.float32
                 else xd.to(torch.float64)).numpy()
            buf = self._rows_buffer(
                self._free_rows(getattr(self._local, "entry", None)), X.shape)
            run = coder.run(X, buf)      # None: not taken (see code)
            if run is None:
                return None
            self._count(X.size)
            entry = self._local.entry = _Entry(key, x2.detach().clone(), None,
                                               coder, run, buf, None, None)
        elif not (same_domain(entry.qm, qw) if entry.qm is not None else
                  self._lean_coder(qw, act_rate, act_mode, x2.shape[-1])):
            return None
        if entry.xsum is None:
            entry.xsum = self._xsum(entry)
        return self._rows(entry), entry.xsum, self._nbytes(entry)

    def _lean_coder(self, qw, act_rate, act_mode, n):
        """The fixed-mode quantizer of rows of length ``n`` when
        :meth:`fused_operand` applies to the weight ``qw`` (the nested
        method in the fixed mode, coded in the domain of ``qw``), else
        None; worked out once per weight, rate, mode and length."""
        memo_key = (id(qw), act_rate, act_mode, n)
        held = self._lean.get(memo_key)
        if held is not None and held[0] is qw:
            return held[1]
        method = qw.method
        mode = default_act_mode(method) if act_mode is None else act_mode
        coder = None
        if method == "nested" and mode == "fixed":
            coder = self._coder(act_rate, qw.seed)
            if not same_domain(coder.domain(n), qw):
                coder = None
        with self._lock:
            if len(self._lean) >= _MAX_LEAN:
                self._lean.clear()
            self._lean[memo_key] = (qw, coder)
        return coder

    def _rows(self, entry) -> np.ndarray:
        """The entry's float32 rows (computed from its matrix the first
        time, when they were not written with the code)."""
        from nqlib.kernels.cpu.coded import scaled_rows_float32

        if entry.rows is None:
            QX = entry.qm
            Y = QX.coded_rows()
            buf = self._rows_buffer(entry.spare, Y.shape)
            scaled_rows_float32(Y, np.ascontiguousarray(QX.row_scales()), buf)
            entry.rows, entry.spare = buf, None
        return entry.rows

    @staticmethod
    def _xsum(entry) -> np.ndarray:
        """``n`` times the entry's row means, float32 (zeros when not
        centred): the mean term of the fused product."""
        if entry.qm is not None:
            (n, a), center, means = (entry.qm.shape, entry.qm.center,
                                     entry.qm.means)
        else:
            (n, a), center, means = (entry.run.shape, entry.coder.center,
                                     entry.run.means)
        return (np.float32(n) * means if center
                else np.zeros(a, dtype=np.float32))

    @staticmethod
    def _nbytes(entry) -> int:
        if entry.qm is None:
            return entry.coder.stream_nbytes(entry.run)
        return entry.qm.stream_nbytes

    def rows_float32(self, QX: QuantizedMatrix) -> np.ndarray:
        """``QX.coded_rows() * QX.row_scales()[:, None]`` in float32 (the
        decoded activation rows as the fused CPU kernel takes them), for the
        ``QX`` that this thread's last :meth:`quantized` call returned:
        computed once for the layers that share the input, in an array that
        the next quantized input of this thread reuses (it must not be kept
        beyond the forward pass)."""
        entry = getattr(self._local, "entry", None)
        if entry is None or entry.qm is not QX:
            raise ValueError("rows_float32 takes the quantized input that this "
                             "thread's last quantized() call returned")
        return self._rows(entry)


#: weights, rates, modes and lengths whose answer :meth:`ActivationCache.\
#: _lean_coder` keeps (then it starts again)
_MAX_LEAN = 4096


class _Entry:
    """A thread's last quantized input: ``key`` and a copy ``x`` of the
    input; the matrix ``qm`` (None until asked for, when the entry was made
    by :meth:`ActivationCache.fused_operand`); the fixed-mode ``coder`` and
    its ``run`` (None for the general path); the float32 ``rows`` and
    ``xsum`` of the fused product (None until computed), and ``spare``, the
    replaced entry's rows array, which computing ``rows`` may reuse."""

    __slots__ = ("key", "x", "qm", "coder", "run", "rows", "xsum", "spare")

    def __init__(self, key, x, qm, coder, run, rows, xsum, spare):
        self.key, self.x, self.qm, self.coder = key, x, qm, coder
        self.run, self.rows, self.xsum, self.spare = run, rows, xsum, spare
