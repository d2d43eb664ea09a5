"""What every training run shares: the base LightningModule, step-keyed sampling, the callbacks (RNG
state, finite-loss guard, export), the run folder, recipe schemas, and the one ``run()`` skeleton that
pretraining methods and fine-tuning tasks plug into."""

from .callbacks import Export, FiniteLossGuard, RngState
from .folder import RunFolder
from .module import TrainingModule, evaluating
from .recipe import ENCODER, TRAINER, DataConfig, FreeForm, OptimConfig, find_recipe, list_recipes, load_config, section
from .runner import KINDS, Built, RecipeKind, Registry, RunPlugin, recipe_kind, run, run_plugin
from .sampling import KeyedDataset, StepData, StepSampler, position_seed
from .trainer import make_trainer

__all__ = [
    "Built", "DataConfig", "ENCODER", "KINDS", "RecipeKind", "recipe_kind", "Export", "FiniteLossGuard", "FreeForm", "KeyedDataset", "OptimConfig", "Registry",
    "RngState", "RunFolder", "RunPlugin", "StepData", "StepSampler", "TRAINER", "TrainingModule", "evaluating", "find_recipe",
    "list_recipes", "load_config", "make_trainer", "position_seed", "run", "run_plugin", "section",
]
