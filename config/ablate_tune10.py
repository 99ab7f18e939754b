# Tuning for 10 minutes: the 5-minute recipe's base (config/ablate_tune2.py) given 2,600 optimizer steps, about
# what 10 minutes of 2 cores run, where the 0.79M training tokens are seen ~7 times: is regularisation worth it?
#   python ablate.py config/ablate_tune10.py
name = "tune10"
base = ["config/quickstart.py", "--lr_schedule=wsd", "--cooldown=0.4", "--min_lr=0.0", "--muon_split=True"]
iters = 2600
jobs = 2
cells = [
    ("wsd_split", {}),
    ("dropout_0.1", {"dropout": 0.1}),
]
