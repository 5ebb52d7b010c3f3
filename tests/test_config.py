"""OptimizeConfig grouped by concern: sections, flat CLI keys, TOML ``version`` and section tables."""
import dataclasses
from pathlib import Path

import pytest

from bfc.cli import main
from bfc.config import (
    FLAT_KEYS,
    SECTIONS,
    Distillation,
    LowBit,
    Objective,
    OptimizeConfig,
    TargetName,
)
from bfc.errors import ConfigError
from bfc.passes.targets import names as target_names

ROOT = Path(__file__).resolve().parent.parent

SECTIONED = """version = 1
structure = "rotated"
max-error = 0.5

[lowbit]
bits = 3
group-size = 128
correction_rank = 8

[distillation]
steps = 7
match = ["a", "b"]

[schedule]
workers = 1

[latency]
objective = "latency"
batch = 4

[verification]
strict = true
"""
FLAT = """structure = "rotated"
max-error = 0.5
bits = 3
group-size = 128
correction-rank = 8
distill-steps = 7
distill-match = ["a", "b"]
workers = 1
objective = "latency"
latency-batch = 4
strict = true
"""


def _toml(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sections_flat_keys_and_keywords_give_one_config(tmp_path):
    sectioned = OptimizeConfig.from_toml(_toml(tmp_path, SECTIONED, "s.toml"))
    flat = OptimizeConfig.from_toml(_toml(tmp_path, FLAT, "f.toml"))
    kw = OptimizeConfig(structure="rotated", max_error=0.5, bits=3, group_size=128, correction_rank=8,
                        distill_steps=7, distill_match=["a", "b"], workers=1, objective="latency", latency_batch=4,
                        strict=True)
    assert sectioned == flat == kw
    assert sectioned.lowbit == LowBit(bits=3, group_size=128, correction_rank=8)
    assert sectioned.distillation == Distillation(steps=7, match=("a", "b"))
    assert sectioned.latency.objective is Objective.LATENCY and sectioned.latency.batch == 4
    assert sectioned.verification.strict and sectioned.verification.enabled
    assert sectioned.schedule.workers == 1 and sectioned.reconstruction.enabled is False


def test_every_flat_key_reaches_its_section_field():
    """Each flat key sets exactly its (section, field); ``flat()`` reads it back under the same key."""
    base = OptimizeConfig(structure="monarch", calibration="c.npz")
    values = {"bits": 2, "group_size": 32, "learn_rotation": True, "rotation_steps": 3, "correction_rank": 4,
              "kronecker_rotation": True, "distill_rotation": True, "distill_blockwise_steps": 4, "distill": "d.npz", "distill_steps": 9, "distill_batch": 5, "distill_lr": 0.25, "distill_match": ("t",),
              "distill_layernorm": True, "distill_headroom": 1.5, "reconstruct": True, "reconstruct_steps": 6, "reconstruct_lr": 0.5,
              "workers": 3, "cluster": "local", "work_dir": "w", "objective": "latency", "latency_batch": 2,
              "latency_seq": 7, "verify": False, "strict": True}
    assert set(values) == set(FLAT_KEYS)
    for key, value in values.items():
        cfg = base.replace(**{key: value})
        sec, field = FLAT_KEYS[key]
        got = getattr(getattr(cfg, sec), field)
        assert got == (Path(value) if key in ("distill", "work_dir") else value), key
        others = [s for s in SECTIONS if s != sec]
        assert all(getattr(cfg, s) == getattr(base, s) for s in others), key
        assert cfg.flat()[key] == got


def test_replace_keeps_the_other_fields_of_a_section():
    cfg = OptimizeConfig(structure="rotated", bits=3, group_size=128).replace(bits=2)
    assert (cfg.lowbit.bits, cfg.lowbit.group_size) == (2, 128)
    assert cfg.replace(lowbit=LowBit(bits=4)).lowbit == LowBit(bits=4)
    assert dataclasses.replace(cfg, seed=5).lowbit == cfg.lowbit


@pytest.mark.parametrize("raw,match", [
    ({"version": 2}, "version = 2 is not a config version"),
    ({"version": "1"}, "version = '1' is not a config version"),
    ({"bits": 3, "lowbit": {"bits": 2}}, r"'bits' and \[lowbit\] bits set the same option"),
    ({"lowbit": {"bits": 2}, "bits": 3}, r"'bits' and \[lowbit\] bits set the same option"),
    ({"distill-steps": 3, "distillation": {"steps": 4}}, r"'distill-steps' and \[distillation\] steps"),
    ({"lowbit": {"colour": 1}}, r"unknown key 'colour' in \[lowbit\]"),
    ({"lowbit": 3}, r"lowbit must be a table"),
    ({"objective": "speed"}, "objective='speed' is not allowed; use one of size|latency"),
    ({"lowbit": {"bits": 5}}, "bits=5 is not allowed"),
    ({"distillation": {"steps": 0}}, "distill_steps=0 must be an integer >= 1"),
])
def test_bad_config_is_one_line_config_error(raw, match):
    with pytest.raises(ConfigError, match=match) as e:
        OptimizeConfig.from_dict(raw)
    assert "\n" not in str(e.value)


def test_keyword_and_section_for_one_option_is_an_error():
    with pytest.raises(ConfigError, match="set the same option"):
        OptimizeConfig(bits=3, lowbit={"bits": 2})


def test_command_line_overrides_a_section_key(tmp_path):
    cfg = OptimizeConfig.from_toml(_toml(tmp_path, SECTIONED), bits=2, latency_batch=8)
    assert (cfg.lowbit.bits, cfg.lowbit.group_size, cfg.latency.batch) == (2, 128, 8)


def test_target_enum_is_the_registry():
    assert sorted(t.value for t in TargetName) == target_names()
    assert OptimizeConfig(target="Custom-Op").target is TargetName.CUSTOM_OP
    with pytest.raises(ConfigError, match="custom-op|ort|portable"):
        OptimizeConfig(target="gpu")


def test_shipped_configs_are_versioned_and_sectioned():
    lowbit = OptimizeConfig.from_toml(ROOT / "models/configs/minilm-l6-lowbit.toml")
    assert lowbit.lowbit == LowBit(bits=3, group_size=64, learn_rotation=True, rotation_steps=100, correction_rank=0)
    distill = OptimizeConfig.from_toml(ROOT / "models/configs/minilm-l6.toml")
    assert distill.distillation == Distillation(steps=700, batch=32, lr=5e-4, match=("op:LayerNormalization",),
                                                blockwise_steps=300)
    for f in (ROOT / "models/configs").glob("*.toml"):
        assert f.read_text().count("\nversion = 1\n") == 1, f


def test_cli_unknown_version_exits_2_with_one_line(tmp_path, capsys):
    cfg = _toml(tmp_path, 'version = 3\nstructure = "monarch"\n')
    rc = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bfc: error: ") and err.count("\n") == 1, err
    assert "version = 3" in err
