"""Training metrics: FLOPs and MFU, TensorBoard."""
