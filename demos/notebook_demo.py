# %% [markdown]
# # subroutine_circuits from a notebook
#
# Cell by cell (open in Jupyter/VS Code as a percent-format notebook, or run as a script):
# a compositional task, a tiny transformer trained on it, a subroutine mask, the ablation
# matrix, a random-init control, and the patching circuit of the same subroutine.
# `SC_DEMO_QUICK=1` shrinks every size (used by the test suite).

# %%
import os
import random

import torch

QUICK = os.environ.get("SC_DEMO_QUICK") == "1"
torch.set_num_threads(1)  # tiny models: one thread is fastest

# %% [markdown]
# ## 1. A task: subject-verb agreement, with predicates A = subject number, B = verb number

# %%
from subroutine_circuits.tasks import get_task, make_splits

task = get_task("agreement_singular")
print(task.predicates, task.rule)
rng = random.Random(0)
print(task.sample({"subject_plural": False, "verb_plural": False}, rng).text)
clean, flipped = task.minimal_pair(
    {"subject_plural": False, "verb_plural": False}, "verb_plural", rng
)
print(clean.text, "|", flipped.text)

n_train, n_eval = (80, 30) if QUICK else (600, 200)
splits = make_splits(task, n_train, seed=0, split_sizes=(n_train, n_eval, n_eval))
tok = task.tokenizer()
print({k: len(v) for k, v in splits["train"].items()})

# %% [markdown]
# ## 2. A tiny transformer trained on the composite odd-one-out task

# %%
from subroutine_circuits.models import ModelSpec, TrainConfig, make_model, train_ooo

model = make_model(ModelSpec("tiny"), tok.vocab_size, seed=0)
res = train_ooo(
    model,
    splits["train"]["composite"],
    splits["val"]["composite"],
    tok,
    TrainConfig(max_steps=40 if QUICK else 600, progress=False),
)
print("best validation accuracy", res.best_val_acc)

# %% [markdown]
# ## 3. A mask for subroutine A, trained with the base model frozen

# %%
from subroutine_circuits.experiment.config import MaskSearchConfig
from subroutine_circuits.experiment.evaluate import ablation_matrix
from subroutine_circuits.experiment.search import encode, train_mask

enc = {s: {k: encode(v, tok) for k, v in kinds.items()} for s, kinds in splits.items()}
mcfg = MaskSearchConfig(steps=20 if QUICK else 100)
mask = train_mask(model, enc["train"]["sub_subject_plural"], mcfg, {"l0_weight": 1.0}, 0, "last")
print(f"kept {int(mask.flat_binary().sum())} of {mask.flat_binary().numel()} units")
for s in mask.stats():
    print(s)

# %% [markdown]
# ## 4. The ablation matrix on test problems, and the verdict

# %%
row = ablation_matrix(
    model,
    mask,
    enc["test"],
    "subject_plural",
    "verb_plural",
    "last",
    seed=0,
    reference=enc["train"]["sub_subject_plural"],
    ablation="mean",
)
for key in ("sub_target_acc", "sub_other_acc", "abl_target_acc", "abl_other_acc", "sub_diff"):
    print(f"{key:>16}: {row[key]:.3f}")
print("abl_diff", round(row["abl_diff"], 3), "compositional:", row["compositional"])

# %% [markdown]
# Apply any mask to the model for the duration of a block (here: the subnetwork ablated):

# %%
from subroutine_circuits.masks import UnitMask
from subroutine_circuits.models import ooo_accuracy

ablated = UnitMask.fixed(mask.unit_map, ~mask.flat_binary().bool())
with ablated.applied(model):
    acc = ooo_accuracy(model, splits["test"]["partition_subject_plural"], tok)
print("target partition with subnetwork zero-ablated:", acc)

# %% [markdown]
# ## 5. Activation and attribution patching for the same subroutine, compared with the mask

# %%
from subroutine_circuits.patching.run import PatchingConfig, run_patching

rows = run_patching(
    model,
    tok,
    task,
    "subject_plural",
    splits["test"],
    mask=mask,
    cfg=PatchingConfig(n_pairs=8 if QUICK else 24, ablation_curve_fractions=()),
)
for r in rows:
    print(
        r["method"], {k: round(float(r[k]), 3) for k in ("jaccard", "spearman", "roc_auc", "cpr")}
    )

# %% [markdown]
# ## 6. The whole experiment (all inits, seeds and controls) is one call:
#
# ```python
# from subroutine_circuits.experiment import demo_config, run_experiment
# results = run_experiment(demo_config(), "out/demo")
# ```
