# Tuning for 10 minutes: the first round's wins (config/ablate_tune.py: wsd, Muon on q, k, v apart, weight decay
# 0.3) given 2,600 optimizer steps, about what 10 minutes of 2 cores run, where the 0.79M training tokens are
# seen ~7 times: is dropout worth its cost there?
#   python ablate.py config/ablate_tune10.py
name = "tune10"
base = ["config/quickstart.py", "--lr_schedule=wsd", "--cooldown=0.4", "--min_lr=0.0", "--muon_split=True",
        "--weight_decay=0.3"]
iters = 2600
jobs = 2
cells = [
    ("wsd_split_wd", {}),
    ("dropout_0.1", {"dropout": 0.1}),
]
