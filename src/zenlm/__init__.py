"""zenlm: pre-training and fine-tuning of Llama-family decoders with 3D parallelism."""

__version__ = "0.1.0"
