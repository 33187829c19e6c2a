"""Typed config: CLI flags, config files and their precedence, and the help text."""

import argparse
import dataclasses
import json

import pytest

from cfdg import config as cfg
from cfdg.cli.common import parse_classes, parse_floats
from cfdg.errors import UserError


@dataclasses.dataclass
class Example:
    steps: int = cfg.option(10, "number of steps")
    rate: float = cfg.option(0.5, "a rate in [0, 1]")
    name: str = cfg.option("tiny", "preset name")
    flag: bool = cfg.option(True, "a switch")
    path: str | None = cfg.option(None, "optional path")


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cfg.add_options(parser, Example)
    return parser.parse_args(argv)


def test_defaults_and_flags():
    assert cfg.build(Example, parse([])) == Example()
    built = cfg.build(Example, parse(["--steps", "3", "--no-flag", "--path", "x"]))
    assert built == Example(steps=3, flag=False, path="x")


def test_toml_file_then_flags(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('steps = 7\nrate = 0.25\n[train]\nsteps = 9\nname = "cpu"\n')
    expected = Example(steps=9, rate=0.25, name="cpu")
    assert cfg.build(Example, parse([]), str(file), section="train") == expected
    assert cfg.build(Example, parse([]), str(file)) == Example(steps=7, rate=0.25)
    # An explicit flag wins over the file.
    built = cfg.build(Example, parse(["--steps", "1"]), str(file), section="train")
    assert built.steps == 1
    assert built.name == "cpu"


def test_yaml_file_with_dashes(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("steps: 4\nflag: false\n")
    assert cfg.build(Example, parse([]), str(file)) == Example(steps=4, flag=False)


def test_unknown_key_names_allowed(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("stepz = 4\n")
    with pytest.raises(UserError, match="stepz.*allowed: flag, name, path, rate, steps"):
        cfg.build(Example, parse([]), str(file))


@pytest.mark.parametrize(
    ("name", "text"), [("a.toml", "steps = "), ("a.yaml", "a: [1"), ("a.ini", "")]
)
def test_bad_config_file(tmp_path, name, text):
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(UserError, match=str(file)):
        cfg.build(Example, parse([]), str(file))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        cfg.build(Example, parse([]), str(tmp_path / "absent.toml"))


def test_help_lists_every_field():
    parser = argparse.ArgumentParser()
    cfg.add_options(parser, Example)
    text = parser.format_help()
    for field in dataclasses.fields(Example):
        assert "--" + field.name.replace("_", "-") in text
        assert field.metadata["help"] in text
    assert "(default: 10)" in text
    assert "(default: none)" in text


def test_save_json_atomic(tmp_path):
    path = cfg.save_json(cfg.to_dict(Example()), tmp_path / "sub" / "config.json")
    assert json.loads(path.read_text())["steps"] == 10
    assert not list(tmp_path.glob("**/*.tmp"))


def test_parse_floats():
    assert parse_floats("0,0.5, 3", "w") == [0.0, 0.5, 3.0]
    assert parse_floats(2, "w") == [2.0]
    assert parse_floats([1, 2], "w") == [1.0, 2.0]
    with pytest.raises(UserError, match="--w"):
        parse_floats("1,x", "w")
    with pytest.raises(UserError, match="finite"):
        parse_floats("1,nan", "w")
    with pytest.raises(UserError, match="empty"):
        parse_floats("", "w")


def test_parse_classes():
    names = ["Bag", "Coat", "Dress"]
    assert parse_classes("all", names) == [0, 1, 2]
    assert parse_classes("2,0", names) == [2, 0]
    assert parse_classes("coat,Bag", names) == [1, 0]
    with pytest.raises(UserError, match="out of range"):
        parse_classes("3", names)
    with pytest.raises(UserError, match="unknown class 'Shoe'"):
        parse_classes("Shoe", names)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('flag = "false"', Example(flag=False)),
        ('flag = "no"', Example(flag=False)),
        ("rate = 1", Example(rate=1.0)),
        ("name = 7", Example(name="7")),
    ],
)
def test_config_file_values_converted(tmp_path, text, expected):
    file = tmp_path / "run.toml"
    file.write_text(text + "\n")
    assert cfg.build(Example, parse([]), str(file)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('steps = "ten"', "'steps' .* must be an integer, got 'ten'"),
        ("steps = 2.5", "'steps' .* must be an integer, got 2.5"),
        ("steps = [1, 2]", "'steps' .* must be an integer"),
        ("steps = true", "'steps' .* must be an integer, got True"),
        ('flag = "maybe"', "'flag' .* must be true or false, got 'maybe'"),
        ('rate = "fast"', "'rate' .* must be a number, got 'fast'"),
        ("name = true", "'name' .* must be a string"),
    ],
)
def test_config_file_wrong_types_rejected(tmp_path, text, message):
    file = tmp_path / "run.toml"
    file.write_text(text + "\n")
    with pytest.raises(UserError, match=message):
        cfg.build(Example, parse([]), str(file))


def test_config_file_invalid_json_and_encoding(tmp_path):
    broken = tmp_path / "run.json"
    broken.write_text("{oops")
    with pytest.raises(UserError, match="invalid JSON"):
        cfg.build(Example, parse([]), str(broken))
    latin = tmp_path / "run.toml"
    latin.write_bytes(b"name = '\xe9'\n")
    with pytest.raises(UserError, match="not UTF-8"):
        cfg.build(Example, parse([]), str(latin))
