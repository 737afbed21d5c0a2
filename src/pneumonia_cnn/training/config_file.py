"""Reading a ``--config`` file (YAML, TOML or JSON) strictly: a key given twice is refused (JSON and YAML kept
the last one quietly; TOML refuses it itself), and YAML's ``1e-3`` is read as the number it reads as in JSON
and TOML (YAML 1.1 needs a dot: it read "1e-3" as text), so that text where a number belongs is always a
quoted value, refused by ``config``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ConfigError
from ..fileio import display_path, not_a_file_reason

PATH_FIELDS = {"data", "init", "weights"}  # paths a run reads; out and cache_dir are made when missing
EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs) -> dict:
    values = {}
    for key, value in pairs:
        if key in values:
            raise DuplicateKey(key)
        values[key] = value
    return values


def _yaml_load(text: str):
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise DuplicateKey(key)
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor says so
                    pass
            return super().construct_mapping(node, deep)

    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{display_path(path)}: {not_a_file_reason(path, 'config file')}")
    if path.suffix.lower() not in ("", ".json", ".yaml", ".yml", ".toml"):  # an INI file had been read as JSON
        raise ConfigError(f"{display_path(path)}: unknown config format {path.suffix!r} (a .yaml, .yml, .toml or "
                          f".json file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{display_path(path)}: not a text config file (not UTF-8 at byte {error.start})") from None
    except OSError as error:  # no permission to read it, an I/O error
        raise ConfigError(f"{display_path(path)}: cannot read config file ({error.strerror or error})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            values = _yaml_load(text) or {}
        elif path.suffix.lower() == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text, object_pairs_hook=_unique_pairs)
    except DuplicateKey as error:
        raise ConfigError(f"{display_path(path)}: {error.key!r} is given twice; give each key once") from None
    except Exception as error:
        raise ConfigError(f"{display_path(path)}: cannot parse config ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{display_path(path)}: config must be a mapping of field: value")
    return values


def check_relative_paths(config_file, given: dict) -> None:
    """A relative path that a config file gives and that is not there is named with the file and with where it
    was looked for: it is read from the working directory, not from the file's folder (``data: ../../d`` in
    cfg/sub/rel.yaml had been refused as "../../d: folder not found", naming no file)."""
    for name, value in given.items():
        if isinstance(value, str) and value and value != "builtin" and not Path(value).is_absolute() \
                and not Path(value).exists():
            raise ConfigError(f"{display_path(config_file)}: {name}: {value}: not found (a relative path in a config "
                              f"file is read from the working directory, {display_path(Path.cwd())}, not from the "
                              f"file's folder)")
