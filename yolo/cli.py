"""Shared behaviour of the command-line entrypoints: one path from any user-input error to one ``ERROR:`` line.

Entrypoints call :func:`run_hydra_main` with their ``@hydra.main`` function (``config_path=CONF_DIR``); it
rewrites ``data=``, ``hyp=`` and ``model=path/to/file.yaml`` first (:mod:`yolo.group_files`). Errors of our own
(:class:`~yolo.errors.UserError`: ``ConfigError``, ``CheckpointError``, ``DatasetError``...) and Hydra's
composition and override errors (a mistyped key, a wrong type, an unknown group option, bad override syntax) all
end in :func:`exit_on_user_error`: one ``ERROR: <key>: <why>`` line on stderr, no traceback, exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from yolo.config import check_export_config, check_predict_config, check_train_config, check_val_config
from yolo.errors import UserError
from yolo.group_files import rewrite_path_overrides

# conf/ beside the package, as an absolute path: Hydra finds it whichever way the entrypoint is started (a console
# script, python -m, a run_*.py file) and from any working directory (an editable install keeps the files here)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (a setting, a path, a file, a dataset): one line, no traceback."""
    return UserError, FileNotFoundError, HydraException


def error_line(e: BaseException) -> str:
    """The one line that says what is wrong: ``<key>: <why>`` where the error names a key."""
    cause = e.__cause__
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        return f"{group}: {name!r} is not an option of conf/{group} (choose from {', '.join(sorted(e.options))})"
    if isinstance(e, OverrideParseException):
        key = e.override.partition("=")[0].lstrip("+~")
        return f"{key}: cannot parse {e.override!r}: {_first_line(e)}"
    if isinstance(e, HydraException) and isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        why = str(getattr(cause, "msg", None) or cause).strip().splitlines()
        return f"{key}: {why[0]}" if key else f"{_first_line(e)}: {why[0] if why else type(cause).__name__}"
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_HYDRA_PACKAGE = Path(hydra.__file__).resolve().parent


def raised_by_hydra(e: BaseException) -> bool:
    """A ``ValueError`` that Hydra raises itself while composing (``model=null`` on a config group)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(e, ValueError) and tb is not None
            and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_HYDRA_PACKAGE))


@contextlib.contextmanager
def exit_on_user_error(code: int = 1):
    """Turn a user-input error into one clear ``ERROR: ...`` line on stderr and a non-zero exit."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, user_error_types()) and not raised_by_hydra(e):
            raise
        print(f"ERROR: {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(code)


class CheckConfigFirst(Callback):
    """Hydra callback (``hydra.callbacks`` of ``conf/train.yaml``, ``val.yaml``, ``predict.yaml``, ``evolve.yaml``): the entry's
    config checks run before Hydra creates the run folder, so a refused setting leaves no folder behind.

    ``check``: ``train`` (:func:`~yolo.config.check_train_config`), ``val``, ``export`` or ``predict``;
    ``schema``: the dotted name of a schema extending :class:`~yolo.config.TrainConfig` (``evolve.config.EvolveConfig``).
    """

    def __init__(self, check: str = "train", schema: str | None = None) -> None:
        self.check, self.schema = check, schema

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])  # what the job will get
        with exit_on_user_error():
            if self.check == "val":
                check_val_config(job)
            elif self.check == "export":
                check_export_config(job)
            elif self.check == "predict":
                check_predict_config(job)
            else:
                check_train_config(job, get_class(self.schema) if self.schema else None)


def run_hydra_main(main: Callable[[], Any]) -> None:
    """Run an entrypoint's ``@hydra.main`` function so that Hydra's composition and override errors reach
    :func:`exit_on_user_error` too: Hydra prints them itself, in several lines, unless ``HYDRA_FULL_ERROR=1``
    makes it raise them. Any other error keeps its full traceback."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with exit_on_user_error():
            sys.argv = rewrite_path_overrides(sys.argv)  # data=, hyp=, model=path/to/file.yaml
            main()
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
