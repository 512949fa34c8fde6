"""Recipes: declarative, reproducible pipelines (source -> merge/prune/convert -> gates -> outputs)."""

from toolbox.recipe.load import LoadedRecipe, RecipeError, builtin_recipes, load_recipe
from toolbox.recipe.ops import GateFailed
from toolbox.recipe.run import RecipeResult, ReproducibilityError, run_recipe
from toolbox.recipe.schema import Recipe, json_schema

__all__ = ["GateFailed", "LoadedRecipe", "Recipe", "RecipeError", "RecipeResult", "ReproducibilityError",
           "builtin_recipes", "json_schema", "load_recipe", "run_recipe"]
