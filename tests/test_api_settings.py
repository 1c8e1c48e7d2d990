"""Server settings: CLI flags over LORA_SERVER_* environment variables over defaults (no model)."""

from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.settings import ServerSettings, build_arg_parser, parse_settings


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("LORA_SERVER_PORT", "9001")
    monkeypatch.setenv("LORA_SERVER_MAX_NUM_SEQS", "3")
    s = parse_settings(["--max-num-seqs", "5", "--pool-bytes", "64MiB", "--api-key", "sk-secret-42"])
    assert s.port == 9001 and s.max_num_seqs == 5
    assert int(s.pool_bytes) == 64 * 2**20
    assert s.api_key is not None and s.api_key.get_secret_value() == "sk-secret-42"
    assert "sk-secret-42" not in repr(s)


def test_to_engine_config():
    s = ServerSettings(pool_bytes=2**26, threads=2, max_waiting=7, dtype="bfloat16", max_lora_rank=64)
    cfg = s.to_engine_config()
    assert isinstance(cfg, EngineConfig)
    assert (cfg.pool_bytes, cfg.num_threads, cfg.max_waiting, cfg.dtype, cfg.max_lora_rank) == (
        2**26, 2, 7, "bfloat16", 64)
    assert cfg.model is None  # the default model


def test_preload_adapters_from_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_SERVER_PRELOAD_ADAPTERS", f"sql={tmp_path}/a, {tmp_path}/chat-v2")
    assert parse_settings([]).preload_specs() == [("sql", tmp_path / "a"), ("chat-v2", tmp_path / "chat-v2")]
    s = parse_settings(["--preload-adapters", f"x={tmp_path}"])
    assert s.preload_specs() == [("x", tmp_path)]


def test_help_documents_every_setting():
    text = build_arg_parser().format_help()
    for name, field in ServerSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert f"LORA_SERVER_{name.upper()}" in text
        assert field.description


@pytest.mark.parametrize("argv", [["--port", "http"], ["--dtype", "int3"], ["--pool-bytes", "-1"]])
def test_bad_values_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_prefix_caching_flag(monkeypatch):
    assert parse_settings([]).to_engine_config().enable_prefix_caching  # on by default
    assert not parse_settings(["--no-enable-prefix-caching"]).to_engine_config().enable_prefix_caching
    monkeypatch.setenv("LORA_SERVER_ENABLE_PREFIX_CACHING", "false")
    assert not parse_settings([]).enable_prefix_caching
    assert parse_settings(["--enable-prefix-caching"]).enable_prefix_caching  # the flag wins
