"""Parallelism applied from outside the model.

dims.py (degrees -> megatron-core process groups, rank-order checks), tensor.py (the layer
factory: plain torch at TP 1, megatron-core TP layers above), cpu.py (CPU shims for
megatron-core), pipeline.py (stage split), engine.py (DeepSpeed). Import the submodules
directly; this package imports nothing, so `zenlm.parallel.dims` stays light.
"""
