"""`make demo` (`python -m pipelines.demo`): the whole STL loop on a laptop CPU.

`run` drives the nine steps through the CLIs; `data` (with `shapes` and `corruptions`) writes the demo
dataset; `summary` computes the closing table; `photos` labels real photos with a real ImageNet teacher.
"""
