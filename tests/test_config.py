from dataclasses import dataclass, field

import pytest

from mmsearch.config import ConfigError, load_config


@dataclass
class Inner:
    size: int = 3
    name: str = "a"


@dataclass
class Job:
    out: str = "runs/x"
    seed: int = 0
    inner: Inner = field(default_factory=Inner)


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("seed: 1\nout: from_file\ninner:\n  size: 5\n")
    cfg = load_config(Job, path, {"out": "from_flag", "seed": None}, ["inner.name=b", "seed=7"])
    assert (cfg.out, cfg.seed, cfg.inner.size, cfg.inner.name) == ("from_flag", 7, 5, "b")
    assert isinstance(cfg, Job) and isinstance(cfg.inner, Inner)


@pytest.mark.parametrize(
    "overrides,message",
    [(["nope=1"], "nope"), (["seed=abc"], "seed"), (["seed"], "key=value"), (["inner.size=x"], "size")],
)
def test_bad_overrides_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, {}, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")
