"""The ``fanin`` command line, in-process: flags built from the config structs, the API key
from the environment, clear errors for bad values and model folders, build-model. The launcher
itself is tested end to end in tests/integration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from apiserver.config import ServerConfig
from apiserver.launch import cli
from ipc.config import EngineConfig

VLLM_FLAGS = {
    "--host", "--port", "--uds", "--api-key", "--served-model-name", "--max-model-len",
    "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--dtype",
    "--allowed-media-domains", "--allowed-local-media-path", "--shutdown-timeout",
    "--renderer-num-workers", "--api-server-count",
}  # fmt: skip


def _configs(*argv: str, env: dict[str, str] | None = None) -> tuple[object, object]:
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli.configs_from_args(args, env=env or {})


def test_serve_has_vllm_flags_and_none_for_the_launchers_wiring() -> None:
    flags = {option.flag for option in cli.serve_options()}
    assert flags >= VLLM_FLAGS
    assert not flags & {"--engine-address", "--metrics-dir", "--model"}
    # Each setting in one struct: no name in both.
    server = {f.name for f in msgspec.structs.fields(ServerConfig)}
    assert not server & {f.name for f in msgspec.structs.fields(EngineConfig)}


def test_flag_values_reach_both_configs() -> None:
    server, engine = _configs(
        "--served-model-name", "tiny", "--api-server-count", "3", "--max-num-seqs", "5",
        "--dtype", "bfloat16", "--no-enable-chunked-prefill", "--allow-private-media-urls",
        "--allowed-media-domains", "a.example", "b.example,c.example", "--max-model-len", "64",
    )  # fmt: skip
    assert server.served_model_name == "tiny"
    assert server.api_server_count == 3 and server.allow_private_media_urls is True
    assert server.allowed_media_domains == ["a.example", "b.example", "c.example"]
    assert engine.max_num_seqs == 5 and engine.dtype == "bfloat16"
    assert engine.enable_chunked_prefill is False and engine.max_model_len == 64


def test_unset_flags_keep_struct_defaults() -> None:
    server, engine = _configs()
    assert server == ServerConfig()
    assert engine.max_num_seqs == 64 and engine.max_model_len is None


def test_cpu_flags_take_a_number_or_auto() -> None:
    server, _ = _configs("--api-server-count", "auto", "--renderer-num-workers", "3")
    assert server.api_server_count == "auto" and server.renderer_num_workers == 3
    assert server.api_server_threads == "auto" and server.engine_cpu_cores == "auto"
    server, _ = _configs("--api-server-threads", "2", "--engine-cpu-cores", "0")
    assert server.api_server_threads == 2 and server.engine_cpu_cores == 0


def test_api_key_from_env_and_flag_wins() -> None:
    server, _ = _configs(env={"FANIN_API_KEY": "from-env"})
    assert server.api_key == "from-env"
    server, _ = _configs("--api-key", "from-flag", env={"FANIN_API_KEY": "from-env"})
    assert server.api_key == "from-flag"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--port", "70000"], "--port"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--dtype", "int8"], "--dtype"),
        (["--api-server-count", "two"], "--api-server-count"),
        (["--api-server-count", "0"], "--api-server-count"),
        (["--renderer-num-workers", "some"], "--renderer-num-workers"),
        # past what the cores can use (this machine has at most a few dozen)
        (["--api-server-count", "256"], "--api-server-count"),
        (["--engine-cpu-cores", "100000"], "--engine-cpu-cores"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_value_is_usage_error_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("fanin ")


def test_hub_id_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "Qwen/Qwen2-VL-2B-Instruct", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "Qwen/Qwen2-VL-2B-Instruct" in err and "Hugging Face" in err


def test_bad_model_dir_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_build_model_prints_the_path(
    default_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "built"
    assert cli.main(["build-model", str(target)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.resolve() == target.resolve()
    config = json.loads((printed / "config.json").read_text(encoding="utf-8"))
    assert config == json.loads((default_model_dir / "config.json").read_text(encoding="utf-8"))


def test_the_launcher_loads_neither_torch_nor_transformers(default_model_dir: Path) -> None:
    """`fanin serve` of a built model starts listening at once: the launcher's modules, the
    model check and the default model's cache (already built) import no heavy library, so
    only the engine core and the API servers pay for them, in parallel."""
    code = (
        "import sys\n"
        "from apiserver.launch import cli, launcher\n"
        f"cli.resolve_model({str(default_model_dir)!r})\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'transformers'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
