# Weight decay for the 5-minute quickstart: 0.6 (config/cpu_10min.py's since round 5) against its 0.3, on two
# seeds, at the ~1,250 steps config/quickstart.py runs in 5 minutes on 2 cores; scored on the whole val split.
# Result (docs/ablate.md): 0.6 is worse on both seeds here, so the quickstart keeps 0.3.
#   python ablate.py config/ablate_wd5.py
name = "wd5"
base = ["config/quickstart.py"]
iters = 1250
jobs = 2
cells = [
    ("base_seed_1337", {"seed": 1337}),
    ("weight_decay_0.6_seed_1337", {"weight_decay": 0.6, "seed": 1337}),
    ("base_seed_1338", {"seed": 1338}),
    ("weight_decay_0.6_seed_1338", {"weight_decay": 0.6, "seed": 1338}),
]
