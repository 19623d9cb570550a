"""Every random number generator a rank uses, captured and restored as one object.

A checkpoint may come back from a partner's bucket, so its RNG file is untrusted: the state is
kept as plain tensors and numbers only, written with torch.save and read back with
``torch.load(weights_only=True)``, which refuses any pickle that would build other objects or
run code. Files of the earlier format (numpy arrays and tuples, loadable only by unpickling
arbitrary objects) are refused like any other file that is not in this format.
"""

from __future__ import annotations

import io
import random
import re
from typing import Any

import numpy as np
import torch

RNG_FORMAT = "spillway-rng-2"

# Python's Mersenne Twister: 624 words of state plus the position.
_PY_WORDS = 625
_NP_WORDS = 624


def capture_rng() -> dict[str, Any]:
    """This process's generators as tensors and plain numbers (what rng_to_bytes writes)."""
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python_version": int(py_version),
        "python_state": torch.tensor(py_words, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_kind": str(np_kind),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator from a state that check_rng_state accepted."""
    random.setstate(
        (
            state["python_version"],
            tuple(int(w) for w in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            state["numpy_kind"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def rng_from_bytes(data: bytes) -> dict[str, Any]:
    """Parse an RNG file without running anything it holds; ValueError says why it is refused."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # an UnpicklingError for a hostile pickle, others for junk
        # torch's message advises turning weights_only off; only its diagnosis is worth keeping.
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", str(exc), re.S)
        why = found.group(1).strip() if found else f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"is not a tensor-only RNG file (refused to unpickle it: {why[:200]})"
        ) from None
    check_rng_state(state)
    return state


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_tensor(value: object, dtype: torch.dtype, length: int | None = None) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == dtype
        and value.dim() == 1
        and (length is None or value.numel() == length)
    )


def check_rng_state(state: object) -> None:
    """Raise ValueError unless ``state`` has exactly the shape capture_rng produces."""
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not an RNG state")
    if state.get("format") != RNG_FORMAT:
        raise ValueError(f"has format {state.get('format')!r}, expected {RNG_FORMAT!r}")
    checks = {
        "python_version": _is_int(state.get("python_version")),
        "python_state": _is_tensor(state.get("python_state"), torch.int64, _PY_WORDS),
        "python_gauss": state.get("python_gauss") is None
        or isinstance(state.get("python_gauss"), float),
        "numpy_kind": isinstance(state.get("numpy_kind"), str),
        "numpy_keys": _is_tensor(state.get("numpy_keys"), torch.int64, _NP_WORDS),
        "numpy_pos": _is_int(state.get("numpy_pos")),
        "numpy_has_gauss": _is_int(state.get("numpy_has_gauss")),
        "numpy_gauss": isinstance(state.get("numpy_gauss"), float),
        "torch": _is_tensor(state.get("torch"), torch.uint8),
    }
    if "cuda" in state:
        checks["cuda"] = _is_tensor(state["cuda"], torch.uint8)
    bad = sorted(key for key, ok in checks.items() if not ok)
    if bad:
        raise ValueError(f"has a malformed RNG state (bad or missing: {', '.join(bad)})")
    for key in ("python_state", "numpy_keys"):
        words = state[key]
        if words.numel() and (int(words.min()) < 0 or int(words.max()) >= 2**32):
            raise ValueError(f"has a malformed RNG state ({key} outside 32 bits)")
