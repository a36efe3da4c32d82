"""Fail fast without the Hugging Face Hub: probe once, then load from the local cache only.

``huggingface_hub`` retries an unreachable host for about 25 s per file; when a 2-second TCP probe
fails (or HF_HUB_OFFLINE is set) loads run in offline mode, which answers from the cache in
milliseconds or raises at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator

HUB_HOST = ("huggingface.co", 443)


def _env_offline() -> bool:
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false", "no")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    if _env_offline():
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Yield whether the hub is reachable; when it is not, force offline mode inside the block."""
    online = hub_reachable()
    if online:
        yield True
        return
    import huggingface_hub.constants as hub_constants

    patched = [(hub_constants, "HF_HUB_OFFLINE")]
    try:
        import datasets.config as ds_config

        patched.append((ds_config, "HF_HUB_OFFLINE"))
    except ImportError:  # pragma: no cover - datasets is a requirement
        pass
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    try:
        for mod, name in patched:
            setattr(mod, name, True)
        yield False
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
