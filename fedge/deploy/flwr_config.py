"""SuperLink connection entries in `$FLWR_HOME/config.toml`, the file `flwr` reads.

Flower 1.41 reads connections from `[superlink.<name>]` tables with `address`
(host:port of the Control API), `root-certificates` (an *absolute* path) or
`insecure = true`. Other entries in the file are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli
import tomli_w

CONFIG_FILE = "config.toml"


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    *,
    root_certificates: Path | None = None,
    insecure: bool = False,
    make_default: bool = True,
) -> Path:
    """Add or replace connection `name`; returns the config file's path."""
    if insecure == (root_certificates is not None):
        raise ValueError("give either root_certificates (TLS) or insecure=True, not both")
    path = flwr_home / CONFIG_FILE
    config: dict[str, Any] = {}
    if path.exists():
        try:
            config = tomli.loads(path.read_text(encoding="utf-8"))
        except tomli.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc}); fix or delete it") from exc
    superlink = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        # Flower rejects relative paths here: the CLI may run from any directory.
        entry["root-certificates"] = str(root_certificates.resolve())
    else:
        entry["insecure"] = True
    superlink[name] = entry
    if make_default:
        superlink["default"] = name
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(_default_first(config)), encoding="utf-8")
    return path


def _default_first(config: dict[str, Any]) -> dict[str, Any]:
    """tomli_w writes plain keys before tables anyway; keep `default` readable on top."""
    superlink = config.get("superlink", {})
    if "default" in superlink:
        config["superlink"] = {"default": superlink["default"]} | {
            k: v for k, v in superlink.items() if k != "default"
        }
    return config
