"""The layout and memory planner behind tools/plan.py (docs/plan.md).

shapes       which parameter tensors a rank holds (TP sharding, pipeline split, optimizer groups)
memory       bytes of parameters, gradients and optimizer states per rank, per DeepSpeed path
activations  bytes autograd keeps per micro batch, per stage in 1F1B
cluster      GPUs, memory, peak FLOP/s, link speeds
cost         estimated step time
search       enumerate layouts through the real validator, rank them
report       table / JSON output
"""
