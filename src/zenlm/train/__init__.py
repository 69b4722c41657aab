"""Training: the Trainer (loop, eval, callbacks), the LR schedule, the loss module."""
