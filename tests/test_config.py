"""GuestConfig: sizes, bounds, files, TOML/JSON loading and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor import GuestConfig
from supervisor.config import ConfigError, parse_size

GUESTS = Path(__file__).resolve().parent.parent / "guests"
HELLO = GUESTS / "hello.img"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16M", 16 << 20),
        ("1G", 1 << 30),
        ("512k", 512 << 10),
        ("64KiB", 64 << 10),
        ("65536", 65536),
        (" 2 MB ", 2 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_defaults_and_name() -> None:
    config = GuestConfig(image=HELLO)
    assert config.memory == 16 << 20
    assert (config.console, config.block, config.block_readonly, config.cmdline) == (
        "capture",
        None,
        False,
        "",
    )
    assert config.display_name == "hello"
    assert GuestConfig(image=HELLO, name="h1").display_name == "h1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"memory": "16X"}, "memory: bad size '16X'"),
        ({"memory": 12345 * 4096 + 1}, "not a multiple of the 4096-byte page"),
        ({"memory": "64K"}, "outside 128K..1G"),
        ({"memory": "2G"}, "outside 128K..1G"),
        ({"memory": True}, "memory"),
        ({"console": "tty"}, "console: Input should be 'stdio', 'capture' or 'null'"),
        ({"colour": "red"}, "colour: unknown setting"),
        ({"image": "/nonexistent/x.img"}, "image: no such file: /nonexistent/x.img"),
        ({"block": "/nonexistent/disk"}, "block: no such file"),
        ({"cmdline": "x" * 4000}, "cmdline: longer than"),
    ],
)
def test_bad_fields_give_one_line(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        GuestConfig.build(**{"image": HELLO, **fields})
    text = str(info.value)
    assert message in text and "\n" not in text
    assert isinstance(info.value, ValueError)


def test_missing_image_is_required() -> None:
    with pytest.raises(ConfigError, match="image: required"):
        GuestConfig.build(memory="1M")


def test_load_toml_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "guest.img").write_bytes(HELLO.read_bytes())
    (tmp_path / "disk").write_bytes(bytes(8192))
    path = tmp_path / "guest.toml"
    path.write_text(
        'image = "guest.img"\nmemory = "2M"\nblock = "disk"\nblock_readonly = true\n'
        'cmdline = "ticks=3"\nconsole = "null"\nname = "g"\n'
    )
    config = GuestConfig.load(path)
    assert config.image == tmp_path / "guest.img" and config.block == tmp_path / "disk"
    assert (config.memory, config.block_readonly, config.cmdline) == (2 << 20, True, "ticks=3")
    assert GuestConfig.load(path, memory="4M", cmdline=None).memory == 4 << 20


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "guest.json"
    path.write_text(json.dumps({"image": str(HELLO), "memory": 1 << 20}))
    assert GuestConfig.load(path).memory == 1 << 20


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("g.yaml", "image: x", "must be a .toml or .json file"),
        ("g.toml", "image = ", "bad TOML"),
        ("g.json", "{", "bad JSON"),
        ("g.json", "[1]", "table/object"),
        ("g.toml", f'image = "{HELLO}"\nmemroy = "1M"\n', "memroy: unknown setting"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        GuestConfig.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        GuestConfig.load(tmp_path / "missing.toml")
