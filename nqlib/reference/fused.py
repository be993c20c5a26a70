"""Numpy oracle of the CPU layout (imports nothing from nqlib).

Reads the packed arrays of :class:`nqlib.quantizers.cpu_layout.CpuLayout`
bit by bit, as documented in :mod:`nqlib.kernels.cpu.fused`, and returns
the decoded rows; ``decoded @ x`` is then the decode-then-matmul product the
fused kernels are tested against.
"""

import numpy as np


def decode_cpu_layout(words, nib, kpl, tab, q_hi, q_lo, h, rows):
    """The raw decoded rows (``rows``, 8 coded) float64: block ``b`` of row
    ``i`` is ``beta (u + c + fix e_k)``.

    ``words`` (G, coded, 8) int32, ``nib`` (G, coded) uint32, ``kpl`` the
    3-byte ``7 - k`` fields, ``tab`` (2, 8) scales; blocks ``[0, h)`` use
    ``q_hi`` and ``tab[0]``, the others ``q_lo`` and ``tab[1]``.
    """
    G, coded, _ = words.shape
    out = np.zeros((8 * G, 8 * coded))
    kb = np.asarray(kpl[:3 * G * coded], dtype=np.int64).reshape(G, coded, 3)
    kfield = kb[..., 0] | kb[..., 1] << 8 | kb[..., 2] << 16
    for g in range(G):
        for b in range(coded):
            q = q_hi if b < h else q_lo
            betas = tab[0] if b < h else tab[1]
            for lane in range(8):
                w = int(words[g, b, lane]) & 0xFFFFFFFF
                u = [(w >> (4 * j)) & 15 for j in range(8)]
                field = (int(nib[g, b]) >> (4 * lane)) & 15
                index, pi = field & 7, field >> 3
                k = 7 - ((int(kfield[g, b]) >> (3 * lane)) & 7)
                if q % 2:
                    odd = sum(u) % 2
                    c = -7.5 - 0.5 * pi
                else:
                    top = u[7]
                    odd = top & 1
                    u[7] = (top & 14) | (sum(u[:7]) % 2)
                    c = -8.0 + 0.5 * pi
                half = np.array(u, dtype=np.float64) + c
                if odd:
                    half[k] += -q if u[k] >= 8 else q
                out[8 * g + lane, 8 * b:8 * b + 8] = float(betas[index]) * half
    return out[:rows]
