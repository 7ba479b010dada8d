"""Registry of built-in tasks: names -> factories, and resolving a name or a data file.

Text tasks (``list_tasks``) and image tasks (``list_vision_tasks``, built lazily from
``tasks.vision``) are listed separately; ``get_task`` resolves either kind of name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from subroutine_circuits.tasks.base import Task
from subroutine_circuits.tasks.language import agreement_task, anaphora_task

_REGISTRY: dict[str, Callable[..., Task]] = {}
_VISION_REGISTRY: dict[str, Callable[..., Any]] = {}

USER_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Register a task factory under ``name`` (an existing name raises ValueError)."""
    if name in _REGISTRY:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    """Names of the registered (built-in) tasks."""
    return list(_REGISTRY)


def register_vision_task(name: str, factory: Callable[..., Any]) -> None:
    """Register an image-task factory under ``name`` (an existing name raises ValueError)."""
    if name in _VISION_REGISTRY or name in _REGISTRY:
        raise ValueError(f"task {name!r} is already registered")
    _VISION_REGISTRY[name] = factory


def list_vision_tasks() -> list[str]:
    """Names of the registered built-in image tasks."""
    return list(_VISION_REGISTRY)


def is_vision_task(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a built-in image task."""
    return str(name) in _VISION_REGISTRY


def get_vision_task(name: str, rule: Mapping[str, bool] | None = None, **kwargs):
    """A built-in image task (``tasks.vision.ImageTask``); ``kwargs`` e.g. ``image_size=40``."""
    if name not in _VISION_REGISTRY:
        raise ValueError(
            f"unknown vision task {name!r}; known vision tasks: {', '.join(list_vision_tasks())}"
        )
    return _VISION_REGISTRY[name](**kwargs).with_rule(rule)


def get_task(name: str, rule: Mapping[str, bool] | None = None, **kwargs) -> Task:
    """A built-in task by name (``kwargs`` go to its factory, e.g. ``cfg=GrammarConfig()``).

    ``rule`` overrides the task's default rule. Image-task names return an ``ImageTask`` (see
    :func:`get_vision_task`). An unknown name raises ValueError listing the known ones.
    """
    if name in _VISION_REGISTRY:
        return get_vision_task(name, rule=rule, **kwargs)
    if name not in _REGISTRY:
        known = list_tasks() + list_vision_tasks()
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
    return _REGISTRY[name](**kwargs).with_rule(rule)


def is_user_file(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a user data file (a .jsonl/.csv/.json suffix or a path with a
    folder) rather than a built-in task."""
    text = str(spec)
    return (
        Path(text).suffix.lower() in (*USER_FILE_SUFFIXES, ".json")
        or os.path.sep in text
        or isinstance(spec, Path)
    )


def load_task(spec: str | os.PathLike, rule: Mapping[str, bool] | None = None) -> Task:
    """A built-in task name or a data file -> Task (``rule`` overrides the default rule).

    The one task loader of the library (experiments, the CLI, the public API).

    Raises:
        FileNotFoundError: a data file that does not exist.
        ValueError: an unknown task name, an unsupported file type or a bad rule.
    """
    rule = rule or None  # an empty rule means the task's default
    if is_user_file(spec):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"task data file not found: {spec}")
        from subroutine_circuits.tasks.user import load_user_task

        return load_user_task(spec, rule=rule)
    return get_task(str(spec), rule=rule)


register_task("agreement_singular", lambda **kw: agreement_task(plural=False, **kw))
register_task("agreement_plural", lambda **kw: agreement_task(plural=True, **kw))
register_task("anaphora_singular", lambda **kw: anaphora_task(plural=False, **kw))
register_task("anaphora_plural", lambda **kw: anaphora_task(plural=True, **kw))


def _vision_factory(name: str) -> Callable[..., Any]:
    def make(**kwargs):
        from subroutine_circuits.tasks.vision.task import vision_task

        return vision_task(name, **kwargs)

    return make


for _name in ("inside_contact", "number_contact", "inside_number"):
    register_vision_task(_name, _vision_factory(_name))
