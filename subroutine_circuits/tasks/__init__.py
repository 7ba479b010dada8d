"""Tasks: predicates, samplers, odd-one-out problems, label examples, splits, tokenizer.

Importing this package never imports torch or TransformerLens.
"""

from subroutine_circuits.tasks.base import (
    DEFAULT_BUCKET_FRACTIONS,
    DEFAULT_SPLIT_SIZES,
    LABEL_WORDS,
    SPLITS,
    LabelExample,
    OOOProblem,
    Stimulus,
    Task,
    make_label_examples,
    make_problems,
    make_splits,
    split_of,
)
from subroutine_circuits.tasks.language import (
    AgreementTask,
    AnaphoraTask,
    GrammarConfig,
    agreement_task,
    anaphora_task,
)
from subroutine_circuits.tasks.registry import (
    get_task,
    get_vision_task,
    is_vision_task,
    list_tasks,
    list_vision_tasks,
    load_task,
    register_task,
)
from subroutine_circuits.tasks.tokenizer import SPECIAL_TOKENS, WordTokenizer


def load_user_task(path, rule=None, predicates=None, name=None):
    """A Task drawn from the rows of a JSONL/CSV file (see ``tasks.user.load_user_task``)."""
    from subroutine_circuits.tasks.user import load_user_task as _load

    return _load(path, rule=rule, predicates=predicates, name=name)


__all__ = [
    "DEFAULT_BUCKET_FRACTIONS",
    "DEFAULT_SPLIT_SIZES",
    "LABEL_WORDS",
    "SPLITS",
    "SPECIAL_TOKENS",
    "AgreementTask",
    "AnaphoraTask",
    "GrammarConfig",
    "LabelExample",
    "OOOProblem",
    "Stimulus",
    "Task",
    "WordTokenizer",
    "agreement_task",
    "anaphora_task",
    "get_task",
    "get_vision_task",
    "is_vision_task",
    "list_tasks",
    "list_vision_tasks",
    "load_task",
    "load_user_task",
    "make_label_examples",
    "make_problems",
    "make_splits",
    "register_task",
    "split_of",
]
