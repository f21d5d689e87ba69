"""Token subsets: a store that keeps a recorded subset of each view's tokens, so that the same
bytes hold more views (``fdcache extract --token-fraction 0.5``: half the patch tokens, twice
the seeds in the same bytes). This module alone decides which rows are kept; the store
records them, training reads them.

* **Which rows.** Every prefix token (CLS, registers) and ``round(fraction x patches)`` (at least one) of the
  patch tokens, drawn without replacement and sorted, by a counter-based generator keyed by
  ``(global seed, seed, sample)`` (numpy Philox, as :mod:`.views`, with a domain tag so the
  stream is not the view's). Any process recomputes any sample's rows in any order, so a
  resumed or re-run extract writes the same bytes.
* **Why CLS is always kept.** A view has one CLS token and it summarises the whole crop:
  dropping it half the time would halve the supervision of the token the fine-tuning and
  the linear probe start from, and nothing else in the map carries it. Patch tokens are
  many and spatially redundant (neighbours of a kept patch see overlapping pixels), which
  is why storing half of them can cost less than storing half the views.
* **Recorded, not recomputed.** The kept rows are stored beside the targets
  (``token_rows [S, N, K]`` int16, written with the shard, crc32c-checked like every chunk):
  a view is data, and a reader in any language gets the rows with the targets.
* **Why the loss needs no change.** FD whitens each token by itself (a non-affine LayerNorm
  over the channels), so a kept token's target is the same whatever else is kept; the loss
  on a subset is ``fd_loss`` on the student's predictions gathered at the kept rows
  (:func:`kept_rows`), the full map's per-token terms averaged over fewer tokens.

A store of fraction 1 is today's store: its binding carries no ``token_subset`` field and
it has no ``token_rows`` array (an absent field means every token). Numpy only: the
reader's DALI workers import the layout, and with it this module, without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codecs.spec import ArraySpec

__all__ = ["ROWS", "TokenSubset", "bad_rows", "kept_rows"]

ROWS = "token_rows"  # the stored array of kept row indices
_DOMAIN = 0x746F6B656E  # "token": keys the subset's stream apart from the view's


@dataclass(frozen=True)
class TokenSubset:
    """``fraction`` of each view's patch tokens kept (prefix tokens always); 1 = every token."""

    fraction: float = 1.0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"token fraction must be in (0, 1], got {self.fraction}")

    @property
    def whole(self) -> bool:
        return self.fraction == 1.0

    def kept(self, tokens: int, prefix: int) -> int:
        """Rows kept of a ``tokens``-row map with ``prefix`` prefix tokens (at least one patch)."""
        if self.whole:
            return tokens
        return prefix + max(1, round(self.fraction * (tokens - prefix)))

    def arrays(self, tokens: int, prefix: int) -> tuple[ArraySpec, ...]:
        """The array the subset adds to a store: the kept rows of each sample-view (none when whole)."""
        if self.whole:
            return ()
        if tokens > np.iinfo(np.int16).max:
            raise ValueError(f"a token subset indexes rows as int16: {tokens} tokens is too many")
        return (ArraySpec(ROWS, np.dtype(np.int16), (self.kept(tokens, prefix),), ("kept_token",)),)

    def rows(self, global_seed: int, seed: int, samples, tokens: int, prefix: int) -> np.ndarray:
        """int16 ``[len(samples), K]``: the kept rows of each sample-view of ``seed``, ascending
        (the prefix rows first)."""
        k = self.kept(tokens, prefix)
        out = np.empty((len(samples), k), np.int16)
        out[:, :prefix] = np.arange(prefix)
        for j, i in enumerate(np.asarray(samples).tolist()):
            key = np.random.SeedSequence([int(global_seed), int(seed), int(i), _DOMAIN]).generate_state(2, np.uint64)
            rng = np.random.Generator(np.random.Philox(key=key))
            out[j, prefix:] = np.sort(rng.choice(tokens - prefix, size=k - prefix, replace=False)) + prefix
        return out

    def keep(self, x, prefix: int, global_seed: int, seed: int, samples) -> tuple:
        """``x [b, L, D]`` (a torch tensor: the teacher's maps of ``samples`` under ``seed``)
        at the kept rows, and the arrays to store beside the codec's (``{}`` when whole)."""
        if self.whole:
            return x, {}
        import torch  # here only: the reader's workers import this module without torch

        rows = torch.from_numpy(self.rows(global_seed, seed, samples, x.shape[1], prefix)).to(x.device)
        return kept_rows(x, {ROWS: rows}), {ROWS: rows}

    def to_dict(self) -> dict:
        return {"fraction": self.fraction}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TokenSubset":
        return cls() if d is None else cls(**d)


def bad_rows(rows: np.ndarray, tokens: int, prefix: int) -> np.ndarray:
    """bool ``[n]``: the samples whose stored rows ``[n, K]`` cannot be what :meth:`TokenSubset.rows`
    writes for a ``tokens``-row map (the prefix rows in order, then patch rows strictly
    ascending below ``tokens``). Not a recomputation of the draw: a store grown by another
    fdcache version keeps its own rows; this catches rows that would gather the wrong tokens
    or index past the map."""
    r = np.asarray(rows).astype(np.int64)
    bad = (r[:, :prefix] != np.arange(prefix)).any(axis=1)
    patches = r[:, prefix:]
    bad |= (patches < prefix).any(axis=1) | (patches >= tokens).any(axis=1)
    bad |= (np.diff(r[:, prefix - 1 if prefix else 0:], axis=1) <= 0).any(axis=1)
    return bad


def kept_rows(x, stored: dict):
    """``x [b, L, D]`` at the rows ``stored[ROWS]`` names (the student's predictions where a
    subset store has targets); ``x`` itself when the store keeps every token."""
    rows = stored.get(ROWS)
    if rows is None:
        return x
    return x.gather(1, rows.to(x.device).long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
