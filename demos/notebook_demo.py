# %% [markdown]
# # subroutine_circuits from a notebook
#
# Cell by cell (open in Jupyter/VS Code as a percent-format notebook, or run as a script):
# a compositional task, a tiny transformer trained on it, a subroutine mask, the ablation
# matrix, and the patching circuit of the same subroutine. Everything comes from the public
# API, `from subroutine_circuits import ...`.
# `SC_DEMO_QUICK=1` shrinks every size (used by the test suite).

# %%
import os
import random

from subroutine_circuits import (
    UnitMask,
    accuracy,
    build_model,
    evaluate_mask,
    get_task,
    make_splits,
    patch,
    train_mask,
    train_model,
)

QUICK = os.environ.get("SC_DEMO_QUICK") == "1"

# %% [markdown]
# ## 1. A task: subject-verb agreement, with subroutines A = subject number, B = verb number

# %%
task = get_task("agreement_singular")
print(task.predicates, task.rule)
rng = random.Random(0)
print(task.sample({"subject_plural": False, "verb_plural": False}, rng).text)
clean, flipped = task.minimal_pair(
    {"subject_plural": False, "verb_plural": False}, "verb_plural", rng
)
print(clean.text, "|", flipped.text)

n_train, n_eval = (80, 30) if QUICK else (600, 200)
splits = make_splits(task, n_train=n_train, n_val=n_eval, n_test=n_eval, seed=0)
print({k: len(v) for k, v in splits["train"].items()})

# %% [markdown]
# ## 2. A tiny transformer trained on the composite odd-one-out task
#
# `build_model` returns a *model adapter*: it knows where the model's units live and how
# stimuli are encoded and read out; `model.model` is the TransformerLens `HookedTransformer`.

# %%
model = build_model(task, preset="tiny", seed=0)
res = train_model(model, splits, max_steps=40 if QUICK else 600, progress=False)
print("best validation accuracy", res.best_val_acc)

# %% [markdown]
# ## 3. A mask for subroutine A, trained with the base model frozen: the subnetwork

# %%
mask = train_mask(model, splits, "subject_plural", steps=20 if QUICK else 100, l0_weight=1.0)
print(f"kept {int(mask.flat_binary().sum())} of {mask.flat_binary().numel()} units")
for s in mask.stats():
    print(s)

# %% [markdown]
# ## 4. The ablation matrix on test problems, and the verdict

# %%
row = evaluate_mask(model, mask, splits, "subject_plural", ablation="mean")
for key in ("sub_target_acc", "sub_other_acc", "abl_target_acc", "abl_other_acc", "sub_diff"):
    print(f"{key:>16}: {row[key]:.3f}")
print("abl_diff", round(row["abl_diff"], 3), "compositional:", row["compositional"])

# %% [markdown]
# Apply any mask to the model for the duration of a block (here: the subnetwork ablated):

# %%
ablated = UnitMask.fixed(mask.unit_map, ~mask.flat_binary().bool())
acc = accuracy(model, splits["test"]["partition_subject_plural"], mask=ablated)
print("target partition with subnetwork zero-ablated:", acc)

# %% [markdown]
# ## 5. Activation and attribution patching for the same subroutine, compared with the mask

# %%
rows = patch(
    model,
    task,
    "subject_plural",
    splits=splits,
    mask=mask,
    n_pairs=8 if QUICK else 24,
    ablation_curve_fractions=(),
)
for r in rows:
    print(
        r["method"], {k: round(float(r[k]), 3) for k in ("jaccard", "spearman", "roc_auc", "cpr")}
    )

# %% [markdown]
# ## 6. The whole experiment (all inits, seeds and controls) is one call:
#
# ```python
# from subroutine_circuits import demo_config, run_experiment
# results = run_experiment(demo_config(), "out/demo")
# ```
