"""Triton kernels and their launchers, one file per op stem (`bn_act.py` serves bn_act and dual_bn_act)."""
