# The context of the 10-minute run, second round: config/ablate_context10.py found 256-token windows better
# than 128 (0.9721 on the whole val split at the same 2,048 tokens a step; 0.9675 at twice that, 16 x 256),
# and 512 at 4 x 512 worse (0.9799: 18% fewer tokens in the time). More tokens a step at 256, and 512 at the
# 4,096 tokens a step that won at 256:
#   python ablate.py config/ablate_context10b.py      # about 22 minutes: run nothing else meanwhile
name = "context10b"
base = ["config/cpu_10min.py"]
budget = 10.0
cells = [
    ("block_256_batch_32", {"block_size": 256, "batch_size": 32}),  # 8,192 tokens a step
    ("block_512_batch_8", {"block_size": 512, "batch_size": 8}),  # 4,096 tokens a step
]
