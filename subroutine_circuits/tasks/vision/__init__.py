"""The vision path's data: shape-world scenes, image OOO problems, minimal pairs, export.

Three built-in tasks over 1-px closed outlines on a white canvas (pure numpy, nothing
downloaded): ``inside_contact`` (``inside``, ``contact``), ``number_contact`` (``number``,
``contact``) and ``inside_number`` (``inside``, ``number``). Every predicate of every generated
image was measured on its own raster before the image was accepted.

    >>> from subroutine_circuits.tasks.vision import vision_task
    >>> task = vision_task("number_contact")            # 32 px by default
    >>> splits = task.make_splits(1000, seed=0)          # splits["train"]["composite"], ...
    >>> x = splits["train"]["composite"].to_tensor()     # float32 [b, 4, 3, h, w]
    >>> pairs = task.make_minimal_pairs("contact", 64)   # for patching

Importing this package imports numpy only (no torch).
"""

from subroutine_circuits.tasks.vision.render import (
    decode_png,
    encode_png,
    problem_grid,
    problems_png,
    problems_svg,
)
from subroutine_circuits.tasks.vision.scenes import (
    WORLDS,
    InsideContactWorld,
    InsideNumberWorld,
    NumberContactWorld,
    PlacementError,
    Relations,
    Scene,
    ShapeWorld,
    WorldConfig,
    relations,
)
from subroutine_circuits.tasks.vision.shapes import (
    augment_labels,
    dihedral,
    make_templates,
    random_colours,
    random_contours,
    render_labels,
)
from subroutine_circuits.tasks.vision.task import (
    NORM_MEAN,
    NORM_STD,
    ImagePairs,
    ImageProblems,
    ImageTask,
    images_to_tensor,
    scene_keys,
    vision_task,
)

VISION_TASKS: tuple[str, ...] = tuple(WORLDS)

__all__ = [
    "NORM_MEAN",
    "NORM_STD",
    "VISION_TASKS",
    "WORLDS",
    "ImagePairs",
    "ImageProblems",
    "ImageTask",
    "InsideContactWorld",
    "InsideNumberWorld",
    "NumberContactWorld",
    "PlacementError",
    "Relations",
    "Scene",
    "ShapeWorld",
    "WorldConfig",
    "augment_labels",
    "decode_png",
    "dihedral",
    "encode_png",
    "images_to_tensor",
    "make_templates",
    "problem_grid",
    "problems_png",
    "problems_svg",
    "random_colours",
    "random_contours",
    "relations",
    "render_labels",
    "scene_keys",
    "vision_task",
]
