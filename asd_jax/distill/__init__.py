"""Distillation: the Self Forcing rollout and the DMD, critic, ASD and ODE-regression losses."""
