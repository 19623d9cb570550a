"""Where the fleet's secrets ended up: for the secrets scan after an e2e run, and its unit test.

`fleet_secrets(state_dir)` collects every secret a local fleet made (each cluster's Ray token,
the API's token, the S3 server's keys) from the records `fleet up` and `launch` wrote;
`find_secrets(roots, secrets, allowed)` reads every file under the roots as raw bytes (text,
binary, SQLite databases with their -wal and -shm files, checkpoints, logs) and says which
secret occurs where, outside the files allowed to hold it (`secret_files(state_dir)`: the
token and credentials files themselves). Objects in a bucket are not files here: copy them
out (fsspec get) into a directory under SPILLWAY_HOME and scan that.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def find_secrets(
    roots: list[Path], secrets: dict[str, str], allowed: set[Path]
) -> list[tuple[Path, str]]:
    """(file, secret's name) for each named secret found in a file under the roots, sorted.
    An allowed path that is a directory allows everything under it. Empty values are no
    secret and are skipped; so are sockets, FIFOs and files that vanish while being read."""
    needles = {name: value.encode() for name, value in secrets.items() if value}
    if not needles:
        return []
    allow = {Path(os.path.realpath(p)) for p in allowed}
    longest = max(len(v) for v in needles.values())
    found: list[tuple[Path, str]] = []
    for path in _files(roots):
        real = Path(os.path.realpath(path))
        if real in allow or any(parent in allow for parent in real.parents):
            continue
        hits = _scan(path, needles, longest)
        found += [(path, name) for name in sorted(hits)]
    return sorted(set(found))


def _files(roots: list[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in roots:
        root = Path(root)
        candidates = [root] if root.is_file() else []
        for top, _, names in os.walk(root, followlinks=False):
            candidates += [Path(top) / n for n in names]
        for path in candidates:
            try:
                mode = path.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and path not in seen:
                seen.add(path)
                yield path


def _scan(path: Path, needles: dict[str, bytes], longest: int) -> set[str]:
    """The names whose value occurs in the file, read in chunks that overlap by one secret's
    length, so that a secret across a chunk boundary is found too."""
    hits: set[str] = set()
    tail = b""
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                window = tail + chunk
                hits |= {name for name, value in needles.items() if value in window}
                tail = window[-(longest - 1) :] if longest > 1 else b""
    except OSError:
        return hits  # gone while being read (a rotated log, a finished temp file)
    return hits


def fleet_secrets(state_dir: Path) -> dict[str, str]:
    """Every secret the local fleets under state_dir made, by a name that says whose: each
    cluster's Ray token (from its record in fleet/FLEET/CLUSTER.json, and the token file beside
    it), the API's token (fleet/FLEET/controller/, and whatever client.json names), and the S3
    server's key and secret (fleet/FLEET/s3/credentials.json, or its record's path)."""
    state_dir = Path(state_dir)
    found: dict[str, str] = {}
    for fdir in sorted((state_dir / "fleet").glob("*")):
        if not fdir.is_dir():
            continue
        fleet = fdir.name
        for record in sorted(fdir.glob("*.json")):
            data = _json(record)
            if "token_path" in data:
                _add_file(found, f"{fleet}/{record.stem} ray token", data["token_path"])
        for token in sorted(fdir.glob("*/token")):
            owner = token.parent.name
            what = "api token" if owner == "controller" else f"{owner} ray token"
            _add_file(found, f"{fleet}/{what}", token)
        api = _json(fdir / "controller" / "api.json")
        if "token_path" in api:
            _add_file(found, f"{fleet}/api token", api["token_path"])
        creds = [fdir / "s3" / "credentials.json"]
        server = _json(fdir / "s3" / "server.json")
        if isinstance(server.get("credentials_path"), str):
            creds.append(Path(server["credentials_path"]))
        for path in creds:
            keys = _json(path)
            for field in ("key", "secret"):
                if isinstance(keys.get(field), str) and keys[field]:
                    found[f"{fleet}/s3 {field}"] = keys[field]
    client = _json(state_dir / "client.json")
    if isinstance(client.get("token_path"), str):
        token_path = Path(client["token_path"]).expanduser()
        if not token_path.is_absolute():
            token_path = state_dir / token_path
        _add_file(found, "client.json api token", token_path)
    return found


def secret_files(state_dir: Path) -> set[Path]:
    """The files allowed to hold the fleet's secrets: each cluster's token file, the API's
    token file and the S3 server's credentials file (what fleet_secrets reads them from)."""
    fleet = Path(state_dir) / "fleet"
    return {
        *fleet.glob("*/*/token"),
        *fleet.glob("*/s3/credentials.json"),
        *(Path(p) for r in fleet.glob("*/*.json") if (p := _json(r).get("token_path"))),
        *(
            Path(p)
            for r in fleet.glob("*/controller/api.json")
            if (p := _json(r).get("token_path"))
        ),
    }


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _add_file(found: dict[str, str], name: str, path: str | Path) -> None:
    try:
        value = Path(path).expanduser().read_text().strip()
    except OSError:
        return
    if value and value not in found.values():
        found[name] = value
