"""Operator commands and configuration: init, info, config validation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from proto.errors import ConfigError
from syncnode.cli import cli
from syncnode.config import DEFAULT_TOML, Config, Limits, load_config


def test_init_creates_key_and_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "node"
    runner = CliRunner()
    first = runner.invoke(cli, ["init", "--data-dir", str(d)])
    assert first.exit_code == 0, first.output
    key = d / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (d / "syncnode.toml").read_text() == DEFAULT_TOML
    before = key.read_bytes()
    again = runner.invoke(cli, ["init", "--data-dir", str(d)])
    assert again.exit_code != 0 and "already exists" in again.output
    assert key.read_bytes() == before
    info = runner.invoke(cli, ["info", "--data-dir", str(d)])
    assert info.exit_code == 0 and "node id:" in info.output and "groups:    0" in info.output


def test_default_config_file_equals_builtin_defaults(tmp_path: Path) -> None:
    (tmp_path / "syncnode.toml").write_text(DEFAULT_TOML)
    assert load_config(tmp_path) == Config(data_dir=tmp_path)


@pytest.mark.parametrize("text, needle", [
    ("listn = '1.2.3.4:5'\n", "unknown setting 'listn'"),
    ("group_commit = 'yes'\n", "group_commit: expected bool"),
    ("[limits]\nmax_frame = -1\n", "[limits] max_frame"),
    ("[limits]\nbogus = 1\n", "unknown setting 'bogus'"),
    ("log_level = 'loud'\n", "log_level"),
    ("listen = \n", "syncnode.toml"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "syncnode.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert needle in str(err.value)


def test_config_values_apply(tmp_path: Path) -> None:
    (tmp_path / "syncnode.toml").write_text(
        "listen = '127.0.0.1:9'\n[limits]\nrequests_per_second = 5\n"
        "[peers]\n'ab' = ['10.0.0.1:7600']\n")
    c = load_config(tmp_path)
    assert c.listen == "127.0.0.1:9" and c.peers == {"ab": ["10.0.0.1:7600"]}
    assert c.limits == Limits(requests_per_second=5.0)


def test_ticket_round_trip_and_errors() -> None:
    from proto.errors import DecodeError
    from proto.ticket import NodeTicket

    t = NodeTicket(b"\x05" * 32, ("127.0.0.1:7600", "[::1]:7600"))
    assert NodeTicket.parse(f"  {t}\n") == t
    for bad in ("", "xx" + str(t)[3:], str(t)[:-3], "sn1!!!!", "sn1" + "a" * 3000):
        with pytest.raises(DecodeError):
            NodeTicket.parse(bad)
