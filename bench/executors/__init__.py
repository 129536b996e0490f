"""Where a benchmark's jobs run.

``local`` (the default) is :func:`bench.runner.run_benchmark`'s own loop: one job after the
other in this process. ``ray`` (:mod:`bench.executors.ray_executor`) runs each job, and each fit
stage several jobs share, as a Ray task on this machine or across a cluster, into the same
results folder and MLflow experiment.
"""
