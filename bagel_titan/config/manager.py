"""Build a validated JobConfig from defaults < TOML file < command-line overrides.

Overrides are ``--section.key value`` or ``--section.key=value``; nested sections use more dots
(``--attention.nsa.topk 8``). A flag given alone (``--job.print_config``) means true.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import tomli_w

from bagel_titan.config.fields import (
    ConfigError,
    build_dataclass,
    closest,
    coerce,
    field_docs,
    field_types,
    parse_cli_value,
    tomllib,
    type_name,
)
from bagel_titan.config.job_config import CORE_SECTIONS, JobConfig

if TYPE_CHECKING:
    from bagel_titan.plugins import PluginManager


@dataclass
class CommandLine:
    """The command line split into its parts (no types yet: sections may come from plugins)."""

    overrides: list[tuple[str, str]] = field(default_factory=list)
    """(dotted key, raw value) in the order given."""
    help: bool = False


def split_command_line(argv: Sequence[str]) -> CommandLine:
    cli = CommandLine()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            cli.help = True
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}: options look like --section.key value (see bagel-titan --help)"
            )
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 2
        else:
            key, raw = body, "true"
            i += 1
        if "." not in key:
            raise ConfigError(f"--{key}: options are --section.key (for example --training.steps 10)")
        cli.overrides.append((key.replace("-", "_"), raw))
    return cli


def all_sections(plugin_sections: dict[str, type]) -> dict[str, type]:
    return {**CORE_SECTIONS, **plugin_sections}


def _resolve_key(dotted: str, sections: dict[str, type]) -> tuple[str, str]:
    """Split ``attention.nsa.topk`` into (section "attention.nsa", key "topk")."""
    section, _, key = dotted.rpartition(".")
    if section in sections:
        return section, key
    top = dotted.split(".", 1)[0]
    if top not in sections:
        raise ConfigError(f"unknown section {top!r} in --{dotted}{closest(top, list(sections))}")
    raise ConfigError(
        f"unknown section {section!r} in --{dotted}{closest(section, list(sections))} "
        f"known sections: {', '.join(sorted(sections))}"
    )


def _field_type(section_cls: type, section: str, key: str) -> Any:
    types_ = field_types(section_cls)
    names = [f.name for f in dataclasses.fields(section_cls) if f.init]
    if key not in names:
        raise ConfigError(
            f"unknown key {key!r} in [{section}]{closest(key, names)} valid keys: {', '.join(names)}"
        )
    return types_[key]


def _split_tables(raw: dict[str, Any], sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Flatten a TOML document into {section name: its own keys} (sub-sections split off)."""
    out: dict[str, dict[str, Any]] = {}

    def visit(prefix: str, table: dict[str, Any]) -> None:
        own = out.setdefault(prefix, {})
        for key, value in table.items():
            child = f"{prefix}.{key}"
            if child in sections and isinstance(value, dict):
                visit(child, value)
            else:
                own[key] = value

    for name, table in raw.items():
        if name not in sections:
            raise ConfigError(
                f"unknown section [{name}]{closest(name, list(sections))} "
                f"known sections: {', '.join(sorted(s for s in sections if '.' not in s))}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table, got {table!r}")
        visit(name, table)
    return out


def read_toml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--job.config_file: no such file {path!r}")
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def plugin_modules(raw_toml: dict[str, Any], cli: CommandLine) -> list[str]:
    """`[job] plugins` (needed before the sections are known, since plugins add sections)."""
    modules = raw_toml.get("job", {}).get("plugins", [])
    for key, raw in cli.overrides:
        if key == "job.plugins":
            modules = parse_cli_value(key, list[str], raw)
    return coerce("job.plugins", list[str], modules)


def config_file_of(cli: CommandLine) -> str:
    path = ""
    for key, raw in cli.overrides:
        if key == "job.config_file":
            path = raw
    return path


def build_job_config(
    raw_toml: dict[str, Any], cli: CommandLine, plugin_sections: dict[str, type]
) -> JobConfig:
    sections = all_sections(plugin_sections)
    tables = _split_tables(raw_toml, sections)
    for dotted, raw in cli.overrides:
        section, key = _resolve_key(dotted, sections)
        tp = _field_type(sections[section], section, key)
        tables.setdefault(section, {})[key] = parse_cli_value(dotted, tp, raw)
    values = {name: build_dataclass(cls, tables.get(name, {}), name) for name, cls in sections.items()}
    job_config = JobConfig(**{name: values[name] for name in CORE_SECTIONS})
    job_config.plugin_sections = {name: values[name] for name in plugin_sections}
    validate(job_config)
    return job_config


def validate(cfg: JobConfig) -> None:
    """Cross-section checks (each section checks its own fields in `__post_init__`)."""
    unknown = sorted(set(cfg.loss.weights) - set(cfg.loss.components))
    if unknown:
        raise ConfigError(
            f"loss.weights names {unknown}, which are not in loss.components {cfg.loss.components}; "
            f"add them to components or remove their weights"
        )
    lora = cfg.lora
    # bf16 frozen weights or adapters compute only in a bf16 job (FSDP's mixed precision casts
    # every parameter and input to it); an fp32 job would mix dtypes in one matmul.
    if lora.enable and "bfloat16" in (lora.base_dtype, lora.dtype) and cfg.training.dtype != "bfloat16":
        raise ConfigError(
            '[lora] base_dtype or dtype = "bfloat16" needs [training] dtype = "bfloat16"; set it, or keep '
            'the [lora] dtypes at "float32"'
        )


def check_run_environment(cfg: JobConfig, plugins: Any) -> None:
    """Checks that need the machine and the plugins, run once when a run starts (before any
    model is built); `--job.print_config` skips them, so a GPU config can be printed anywhere."""
    import torch

    if cfg.training.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[training] device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    on_cpu = cfg.training.device == "cpu" or not torch.cuda.is_available()
    if not cfg.model.name:
        raise ConfigError(
            f"[model] name is not set; name the model spec to train, one of: "
            f"{', '.join(sorted(plugins.model_specs.names()))}"
        )
    if not cfg.loss.components:
        raise ConfigError(
            f"[loss] components is empty; list the loss components to train with, from: "
            f"{', '.join(sorted(plugins.loss_components.names()))}"
        )
    model_spec = plugins.model_specs.get(cfg.model.name)
    flavors = model_spec.flavors
    if flavors and cfg.model.flavor not in flavors:
        raise ConfigError(
            f"[model] flavor {cfg.model.flavor!r} is not a flavor of model {cfg.model.name!r}; "
            f"choose one of: {', '.join(sorted(flavors))}"
        )
    backends = {"[attention] backend": cfg.attention.backend}
    backends.update(model_spec.attention_backends(cfg))
    for key, name in backends.items():
        if name and on_cpu and not plugins.attention_backends.get(name).trains_on_cpu:
            raise ConfigError(
                f"{key} = {name!r} cannot train on the CPU (no backward there); use "
                f"'sdpa' or 'eager' for a CPU run, or run on a GPU"
            )
    for key in ("pretrained_path", "tokenizer_path"):
        path = getattr(cfg.model, key)
        if path and not os.path.exists(path):
            raise ConfigError(
                f"[model] {key} {path!r} does not exist; fix the path (relative paths "
                f"resolve against {os.getcwd()!r}) or leave it empty"
            )
    if cfg.checkpoint.initial_load_path and not os.path.isdir(cfg.checkpoint.initial_load_path):
        raise ConfigError(
            f"[checkpoint] initial_load_path {cfg.checkpoint.initial_load_path!r} is not a "
            f"folder; point it at a step-<N> checkpoint folder"
        )


def load_job_config(
    argv: Sequence[str], plugins_factory: Callable[[Sequence[str]], PluginManager] | None = None
) -> tuple[JobConfig, PluginManager]:
    """Parse `argv` (without the program name) into a JobConfig and its PluginManager."""
    from bagel_titan.plugins import get_plugin_manager

    cli = split_command_line(argv)
    path = config_file_of(cli)
    raw = read_toml(path) if path else {}
    factory = plugins_factory or get_plugin_manager
    plugins = factory(plugin_modules(raw, cli))
    sections = {name: plugins.config_sections.get(name) for name in plugins.config_sections.names()}
    clashes = set(sections) & set(CORE_SECTIONS)
    if clashes:
        raise ConfigError(f"plugin sections {sorted(clashes)} clash with core sections")
    job_config = build_job_config(raw, cli, sections)
    job_config.job.config_file = path
    return job_config, plugins


# ---------------------------------------------------------------------------------------------
# Output: --help and the resolved TOML
# ---------------------------------------------------------------------------------------------


def help_text(plugin_sections: dict[str, type]) -> str:
    lines = [
        "usage: bagel-titan --job.config_file FILE.toml [--section.key value ...]",
        "",
        "Every key below can be set in the TOML file ([section] key = value) or on the command",
        "line (--section.key value or --section.key=value); the command line wins.",
    ]
    for name, cls in all_sections(plugin_sections).items():
        lines += ["", f"[{name}]" + ("  (from a plugin)" if name in plugin_sections else "")]
        docs = field_docs(cls)
        types_ = field_types(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            value = getattr(default, f.name)
            shown = _inline_toml(value) if not _is_table_list(value) else "[]"
            lines.append(f"  --{name}.{f.name} ({type_name(types_[f.name])}, default: {shown})")
            if docs.get(f.name):
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines) + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value)


def _inline_toml(value: Any) -> str:
    """`value` as tomli_w writes it, on one line (tomli_w puts each array item on its own line;
    wrapped in an array, a table is written inline)."""
    text = tomli_w.dumps({"v": [value]}).strip().removeprefix("v = ")
    text = re.sub(r"\[\s+", "[", re.sub(r",?\s+\]", "]", re.sub(r"\n\s*", " ", text)))
    return text[1:-1]


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as a TOML document that `load_job_config` reads back identically
    (written by tomli_w; a plugin section "a.b" becomes the table [a.b])."""
    document: dict[str, Any] = {}
    for name, section in {**{n: getattr(cfg, n) for n in CORE_SECTIONS}, **cfg.plugin_sections}.items():
        table = document
        for part in name.split("."):
            table = table.setdefault(part, {})
        table.update(dataclasses.asdict(section))
    return tomli_w.dumps(document)


def main_help(argv: Sequence[str]) -> str:
    """Help text including the sections of plugins named in `argv`'s TOML / --job.plugins."""
    from bagel_titan.plugins import get_plugin_manager

    cli = split_command_line([a for a in argv if a not in ("-h", "--help")])
    path = config_file_of(cli)
    raw = read_toml(path) if path else {}
    plugins = get_plugin_manager(plugin_modules(raw, cli))
    sections = {name: plugins.config_sections.get(name) for name in plugins.config_sections.names()}
    return help_text(sections)
