"""Everything a run will need, checked before its first stage starts: a mistake costs seconds, not the hours of
a teacher's training, and leaves nothing behind (no run directory is made until these pass)."""

from __future__ import annotations

from hashdistill.data import build_dataset, check_data
from hashdistill.recipe import Recipe


def check_run(recipe: Recipe) -> None:
    """The data (root, classes, labelled fraction) and the models (names, arguments, weights files) of ``recipe``;
    the first problem is a UserError that names it."""
    from hashdistill.distill.models import check_recipe_models

    check_data(recipe.data)
    if recipe.data.dataset == "imagefolder":
        from hashdistill.data.imagefolder import check_folders

        check_folders(recipe.data)
    classes = len(build_dataset(recipe.data, "val").class_names)
    check_recipe_models(recipe.teacher.backbone, recipe.teacher.bits, recipe.student.model,
                        recipe.student.model_kwargs, recipe.data.image_size, classes, recipe.teacher.weights,
                        recipe.student.weights)
