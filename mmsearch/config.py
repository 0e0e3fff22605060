"""Typed job configs: a dataclass schema, merged with a YAML file and `key=value` overrides.

Precedence, lowest first: the schema's defaults, `--config FILE`, the subcommand's own flags,
then `key=value` overrides from the command line. Unknown keys and wrong types are errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the job's schema."""


def load_config(
    schema: type[T],
    config_path: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a `schema` instance from defaults, a YAML file, flag values and dotlist overrides."""
    try:
        cfg = OmegaConf.structured(schema)
        if config_path is not None:
            path = Path(config_path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        set_flags = {k: v for k, v in (flags or {}).items() if v is not None}
        if set_flags:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_nest(set_flags)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None


def to_yaml(config: Any) -> str:
    """The config as YAML, for logging next to a job's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _nest(flat: Mapping[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} so flags can target nested keys."""
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
