# Tuning the quickstart recipe: 1,200 optimizer steps a cell (what config/quickstart.py took in 4.5 minutes
# on 2 cores), so cells that do not change the time a step takes compare exactly, and run two at a time.
#   python ablate.py config/ablate_tune.py
name = "tune"
base = ["config/quickstart.py"]
iters = 1200
jobs = 2
cells = [
    ("base", {}),
    ("min_lr_0", {"min_lr": 0.0}),
    ("wsd", {"lr_schedule": "wsd", "cooldown": 0.4, "min_lr": 0.0}),
    ("linear", {"lr_schedule": "linear", "min_lr": 0.0}),
    ("lr_5e-3", {"learning_rate": 5e-3, "min_lr": 5e-4}),
    ("muon_split", {"muon_split": True}),
    ("zero_init", {"zero_init": True}),
    ("untied", {"tie_embeddings": False}),
    ("weight_decay_0", {"weight_decay": 0.0}),
    ("weight_decay_0.3", {"weight_decay": 0.3}),
]
