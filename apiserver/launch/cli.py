"""The ``fanin`` command: ``fanin serve [MODEL]``, ``fanin build-model DIR``, ``fanin bench ...``
(the load generator, in the separate ``bench`` package), ``fanin --version``.

The flags of ``serve`` are built from the fields of ``ServerConfig`` and ``EngineConfig`` (name,
type, help and default come from the struct), so every setting is defined once. Values are
validated by ``msgspec.convert`` into those structs: a bad value is a usage error (exit 2) that
names the flag.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from apiserver.config import ServerConfig
from apiserver.version import fanin_version
from ipc.config import EngineConfig
from ipc.lifecycle import name_process

API_KEY_ENV = "FANIN_API_KEY"


@dataclass(frozen=True)
class Option:
    """One ``serve`` flag and the config struct(s) its value goes to."""

    name: str
    kind: Any  # the field type without Annotated / None
    default: Any
    description: str
    targets: tuple[type[msgspec.Struct], ...]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, str]:
    """``Annotated[T | None, Meta(description=...)]`` -> (T, description)."""
    description = ""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        for extra in extras:
            if isinstance(extra, msgspec.Meta) and extra.description:
                description = extra.description
        return _unwrap(annotation)[0], description
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation, description


def serve_options() -> list[Option]:
    """Every ``serve`` flag, in struct field order (server fields first)."""
    options: dict[str, Option] = {}
    for struct in (ServerConfig, EngineConfig):
        hints = typing.get_type_hints(struct, include_extras=True)
        for field in msgspec.structs.fields(struct):
            kind, description = _unwrap(hints[field.name])
            # One place for each setting: a name in both structs would be two facts.
            assert field.name not in options, f"{field.name} is in both config structs"
            default = None if field.default is msgspec.NODEFAULT else field.default
            options[field.name] = Option(field.name, kind, default, description, (struct,))
    return list(options.values())


def _add_option(group: argparse._ArgumentGroup, option: Option) -> None:
    shown = option.default if option.default not in (None, "") else "unset"
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": option.name}
    kw["help"] = f"{option.description} (default: {shown})"
    kind = option.kind
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        kw.update(choices=choices, type=type(choices[0]))
    elif typing.get_origin(kind) is list:
        # vLLM style: space-separated values; commas are accepted too.
        kw.update(nargs="+", type=str, metavar="VALUE")
    elif kind in (int, float, str):
        kw["type"] = kind
    elif words := _int_or_words(kind):
        kw.update(type=_IntOrWords(words), metavar="{N," + ",".join(words) + "}")
    else:
        raise TypeError(f"no flag type for {option.name}: {kind!r}")
    group.add_argument(option.flag, **kw)


def _int_or_words(kind: Any) -> tuple[str, ...]:
    """The words of ``int | Literal[words]`` (e.g. ``--api-server-count N|auto``), else ()."""
    if typing.get_origin(kind) not in (typing.Union, types.UnionType):
        return ()
    members = [_unwrap(member)[0] for member in typing.get_args(kind)]
    literals = [m for m in members if typing.get_origin(m) is Literal]
    if int not in members or len(literals) != 1 or len(members) != 2:
        return ()
    return tuple(str(word) for word in typing.get_args(literals[0]))


@dataclass(frozen=True)
class _IntOrWords:
    """argparse type of an ``int | Literal[words]`` flag."""

    words: tuple[str, ...]

    def __call__(self, text: str) -> int | str:
        if text in self.words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer or {' or '.join(self.words)}, got {text!r}"
            ) from None


def build_parser() -> argparse.ArgumentParser:
    """The whole ``fanin`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fanin", description="OpenAI-compatible server: N API servers, one engine core."
    )
    parser.add_argument("--version", action="version", version=f"fanin {fanin_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model (default: the built-in tiny model)")
    serve.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model directory (Hugging Face layout); omitted: build/serve the default model",
    )
    groups = {
        ServerConfig: serve.add_argument_group("API server"),
        EngineConfig: serve.add_argument_group("engine core"),
    }
    for option in serve_options():
        _add_option(groups[option.targets[0]], option)
    build = commands.add_parser("build-model", help="build the default tiny model into DIR")
    build.add_argument("dir", metavar="DIR", help="folder to write the model to")
    # Listed for --help only: main() hands everything after "bench" to the bench package.
    commands.add_parser("bench", help="load generator and server sweeps (fanin bench --help)")
    return parser


def configs_from_args(
    args: argparse.Namespace, env: typing.Mapping[str, str] | None = None
) -> tuple[ServerConfig, EngineConfig]:
    """Validated configs from parsed ``serve`` arguments. Raises ``ValueError`` naming the
    flag for a bad value."""
    env = os.environ if env is None else env
    values: dict[type[msgspec.Struct], dict[str, Any]] = {ServerConfig: {}, EngineConfig: {}}
    for option in serve_options():
        if option.name not in vars(args):
            continue
        value = getattr(args, option.name)
        if typing.get_origin(option.kind) is list:
            value = [part for item in value for part in item.split(",") if part]
        for struct in option.targets:
            values[struct][option.name] = value
    if "api_key" not in values[ServerConfig] and env.get(API_KEY_ENV):
        values[ServerConfig]["api_key"] = env[API_KEY_ENV]
    try:
        server = msgspec.convert(values[ServerConfig], ServerConfig)
        engine = msgspec.convert(values[EngineConfig], EngineConfig)
    except msgspec.ValidationError as e:
        raise ValueError(_name_flag(str(e))) from None
    if not isinstance(logging.getLevelName(server.log_level.upper()), int):
        raise ValueError(
            f"--log-level: expected debug, info, warning or error, got {server.log_level!r}"
        )
    return server, engine


def _name_flag(message: str) -> str:
    """msgspec says ``... - at `$.max_num_seqs```; users typed ``--max-num-seqs``."""
    match = re.search(r" - at `\$\.(\w+)[^`]*`$", message)
    if not match:
        return message
    flag = "--" + match.group(1).replace("_", "-")
    return f"{flag}: {message[: match.start()]}"


def resolve_model(model: str | None) -> Path:
    """The model directory to serve: the built default model, or a checked user directory.
    Raises ``ModelDirError`` (a ``ValueError``) with a message naming the bad file."""
    from apiserver.launch import default_model

    if model is None:
        return default_model.ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists() and not model.startswith((".", "/", "~")):
        raise default_model.ModelDirError(
            f"model {model!r} is not a directory. fanin cannot download from the Hugging Face "
            "hub: fetch it first (e.g. `huggingface-cli download "
            f"{model} --local-dir DIR`) and run `fanin serve DIR`"
        )
    default_model.check_model_dir(path)
    return path.resolve()


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from apiserver import cpu_budget

    try:
        server, engine = configs_from_args(args)
        share = cpu_budget.plan(server, cpu_budget.usable_cores())
    except ValueError as e:  # BudgetError included: a flag this machine cannot honour
        parser.error(str(e))
    logging.basicConfig(
        level=server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from apiserver.launch.launcher import Launcher
    from apiserver.launch.listener import LaunchError, bind_listener, remove_uds

    name_process("fanin-launcher")
    # A fatal signal (SIGSEGV in native code, SIGABRT) writes every thread's stack to the
    # log, here and in the API servers forked from this process (the handler and its fd are
    # inherited). On the GPU host one of 14 servers died of SIGSEGV at start, saying nothing.
    # fd 2, not sys.stderr: that may be a stand-in without a descriptor (main() called
    # in-process, its output captured).
    faulthandler.enable(file=2)
    try:
        # Bound before the model is checked or built: a port in use fails in milliseconds.
        listener = bind_listener(server)
    except LaunchError as e:
        print(f"fanin: error: {e}", file=sys.stderr)
        return 1
    try:
        model = resolve_model(args.model)
    except ValueError as e:
        listener.close()
        remove_uds(server)
        print(f"fanin: error: {e}", file=sys.stderr)
        return 1
    code = Launcher(server, engine, share, str(model)).run(listener)
    # Every child is gone and the run dir removed. What is left is the interpreter's teardown:
    # seconds of garbage collection over the torch and transformers the launcher imported for
    # its API servers (``preload``), which a supervisor would wait out.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _build_model(args: argparse.Namespace) -> int:
    from apiserver.launch.default_model import build_model

    try:
        path = build_model(Path(args.dir))
    except OSError as e:
        print(f"fanin: error: cannot build the model in {args.dir}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fanin`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from bench.cli import main as bench_main  # the client side: never loaded by `serve`

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    return _build_model(args)


if __name__ == "__main__":
    sys.exit(main())
