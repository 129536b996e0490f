"""One job, from fit to record, the same whichever executor runs it.

- :mod:`bench.job.data`: the test split and a fit's training images.
- :mod:`bench.job.fitting`: fit or load (the fitted-state cache, fit stages, the fit log).
- :mod:`bench.job.predicting`: prediction into the evaluator; predictions kept after a failure.
- :mod:`bench.job.record`: the job's record (the results folder's schema).
- :mod:`bench.job.run`: :func:`~bench.job.run.run_job`, which chains them.
- :mod:`bench.job.summary`: its console lines.
"""
