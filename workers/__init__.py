"""Execution side of the batch-inference runner: everything that runs inside an actor.

`workers` never imports `jobs`; types that cross the boundary live here.
"""
