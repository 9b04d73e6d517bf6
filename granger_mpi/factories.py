"""``"package.module:factory"``: how a job file names code of the user's own (a metrics
reporter, a model). The module must be importable on every rank: installed, or its
directory on ``PYTHONPATH``."""

import importlib

from granger_mpi.errors import UserError


def is_spec(text: str) -> bool:
    """Whether ``text`` has the form ``package.module:factory``."""
    return text.count(":") == 1 and all(text.split(":"))


def load(spec: str, where: str):
    """The callable ``spec`` names; a ``UserError`` beginning with ``where`` otherwise."""
    if not is_spec(spec):
        raise UserError(f"{where} must be 'package.module:factory'")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"{where}: {exc} (install it, or put its directory on PYTHONPATH)") from None
    except ImportError as exc:
        raise UserError(f"{where}: {exc}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise UserError(f"{where}: module {module_name!r} has no {name!r}") from None
