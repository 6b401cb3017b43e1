"""Config groups given as files, as upstream takes them: ``data=``, ``hyp=`` and ``model=path/to/file.yaml``.

``data``, ``hyp`` and ``model`` are Hydra config groups (``conf/<group>/*.yaml``: ``hyp=scratch-low``). Upstream's
users pass files instead (``--data``, ``--hyp``, ``--cfg``), such as an evolution's ``hyp_evolve.yaml``. The
entrypoints rewrite such an override before Hydra reads the command line (:func:`rewrite_path_overrides`):

* ``data=path.yaml`` → ``data=external data.file=/abs/path.yaml`` (the dataset YAML is read later, as-is);
* ``hyp=path.yaml`` / ``model=path.yaml``: the file is read now and checked against the group's schema
  (:class:`~yolo.config.HypConfig`, :class:`~yolo.config.ModelConfig`: an unknown key, a bad value, a missing file
  is one :class:`~yolo.errors.ConfigError` naming the key and the file), then stored in Hydra's ConfigStore as an
  option of the group (``hyp=file-hyp_evolve-1a2b3c4d``). Choosing it puts the file's values in ``hyp`` (keys the
  file leaves out keep the schema's defaults) and its absolute path in ``hyp_file`` (``model_file``), so the run's
  ``config.yaml`` and MLflow params record both. Later overrides (``hyp.lr0=0.02``) still apply, sweeps over files
  (``-m hyp=a.yaml,b.yaml``) work, and Hydra's launchers carry the ConfigStore to their job processes.

Relative paths resolve against the directory the command was run in.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from yolo.config import HypConfig, ModelConfig, check_config
from yolo.errors import ConfigError

# group -> (schema of its options, top-level key recording the file)
FILE_GROUPS: dict[str, tuple[type, str]] = {"hyp": (HypConfig, "hyp_file"), "model": (ModelConfig, "model_file")}
YAML_SUFFIXES = (".yaml", ".yml")


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_mapping(group: str, path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{group}: no such file: {path}" if not path.exists() else f"{group}: not a file: {path}")
    try:
        node = OmegaConf.load(path)  # OmegaConf's YAML rules, as for conf/ (1e-3 is a number)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{group}: {path}: not a readable YAML file: {_first_line(e)}") from None
    if not isinstance(node, DictConfig) or len(node) == 0:
        schema = FILE_GROUPS[group][0]
        raise ConfigError(f"{group}: {path} holds no {group} settings (a mapping of {schema.__name__}'s keys)")
    return node


def load_group_file(group: str, path: str | Path) -> dict[str, Any]:
    """The settings of a ``hyp`` or ``model`` file, checked by the group's schema (keys, types, domains), as a
    plain dict of the keys the file holds. Raises :class:`ConfigError` naming the key and the file."""
    schema = FILE_GROUPS[group][0]
    path = Path(path)
    node = _read_mapping(group, path)
    _refuse_interpolations(group, node, path)
    try:
        check_config(node, schema, prefix=f"{group}.")
        OmegaConf.merge(OmegaConf.structured(schema), node)  # the types, as Hydra will merge it
        values = OmegaConf.to_container(node, resolve=True)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{group}.{key}: {_first_line(e)} (in {path})" if key
                          else f"{group}: {_first_line(e)} (in {path})") from None
    if group == "model":
        for key in ("backbone", "head"):
            if not values.get(key):
                raise ConfigError(f"model.{key}: required: an architecture in upstream's layout has its "
                                  f"{key} rows (in {path})")
    return values


def _refuse_interpolations(group: str, node: DictConfig, path: Path) -> None:
    """A file's values are data: ``${...}`` (an environment variable, another key) is refused, never resolved."""
    for key, value in OmegaConf.to_container(node, resolve=False).items():
        if "${" in str(value):
            raise ConfigError(f"{group}.{key}: interpolations (${{...}}) are not accepted in a file, "
                              f"give the value itself (in {path})")


def option_name(path: Path) -> str:
    """The group option a file becomes: ``file-<stem>-<8 hex digits of its absolute path>``."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40] or "file"
    return f"file-{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def register_group_file(group: str, path: str | Path) -> str:
    """Check the file and store it as an option of ``group`` in Hydra's ConfigStore; returns the option's name."""
    path = Path(path).expanduser().resolve()
    values = load_group_file(group, path)
    name = option_name(path)
    node = {group: values, FILE_GROUPS[group][1]: str(path)}
    ConfigStore.instance().store(group=group, name=name, node=node, package="_global_")
    return name


def _is_yaml_path(value: str) -> bool:
    return value.endswith(YAML_SUFFIXES)


def rewrite_path_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides naming files for ``data``, ``hyp`` or ``model`` rewritten into what Hydra composes
    (see the module's text); every other argument, and a group option (``hyp=scratch-low``), is left alone."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+")
        if not sep or key not in (group, f"+{group}"):
            out.append(arg)
        elif group == "data" and _is_yaml_path(value) and "," not in value:
            out += ["data=external", f"data.file={Path(value).expanduser().resolve()}"]
        elif group in FILE_GROUPS and value and all(_is_yaml_path(v) for v in value.split(",")):
            out.append(f"{group}=" + ",".join(register_group_file(group, v) for v in value.split(",")))
        else:
            out.append(arg)
    return out
