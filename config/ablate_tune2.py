# Tuning, second round: the first round's two wins together (config/ablate_tune.py: the wsd schedule, Muon on
# q, k, v apart), then one change a cell. 1,200 optimizer steps a cell, two cells at a time.
#   python ablate.py config/ablate_tune2.py
name = "tune2"
base = ["config/quickstart.py", "--lr_schedule=wsd", "--cooldown=0.4", "--min_lr=0.0", "--muon_split=True"]
iters = 1200
jobs = 2
cells = [
    ("wsd_split", {}),
    ("lr_5e-3", {"learning_rate": 5e-3}),
    ("muon_lr_1e-2", {"muon_lr": 1e-2}),
    ("qk_norm", {"qk_norm": True}),
    ("relu2", {"mlp": "relu2"}),
]
