"""The wind tunnel: Bayesian search of the µP hyperparameters on a small proxy, then transfer.

Xmodel-2 tuned four µP values (scale_emb, dim_model_base, scale_depth and the learning rate) on
a ~6M-parameter proxy with Bayesian optimisation and carried them to 1.2B unchanged. Here every
trial is a real ``xm2 fit`` of a shortened recipe (the proxy's configs, a token budget, the same
WSD shape), run by :func:`xm2.run.run` exactly as ``xm2 fit`` runs it, proposed by Optuna (TPE,
or a GP), stopped early when it diverges (recorded FAILED) or when its intermediate validation
losses are hopeless (PRUNED).

The study lives in an Optuna storage (a journal file, or an RDB URL such as PostgreSQL), so an
interrupted study resumes where it stopped and any number of worker processes, on one machine
or many, can run the same command against the same storage and share the trials. MLflow gets one
parent run per study (created by the process that creates the study) and one child run per
trial; the parent holds the best values, the optimisation history, importances, slice plots and
``best.yaml``, a config that ``xm2 fit`` runs as is. ``action: transfer`` trains a wider model
at the best values and at learning rates 2^k around the best one, under the same parent.

One module per job, each importing only those before it in this list:

- :mod:`~xm2.studies.windtunnel.settings`: the searched space and the run, sampler, pruner and
  transfer settings of the command.
- :mod:`~xm2.studies.windtunnel.callbacks`: the Lightning callbacks of a trial's fit
  (divergence guard; reports to the Optuna trial, pruning, heartbeat; the study's parameters).
- :mod:`~xm2.studies.windtunnel.recipe`: the ``xm2 fit`` config files as ``xm2 fit`` parses
  them, the overrides that shorten them to a trial, and one tracked fit through ``xm2.run``.
- :mod:`~xm2.studies.windtunnel.study`: the Optuna study: samplers, pruners, storage, creating or
  joining it, and failing the trials of workers that are gone.
- :mod:`~xm2.studies.windtunnel.trial`: one trial (sample, fit, tell), and data preparation.
- :mod:`~xm2.studies.windtunnel.report`: the study's summary, figures and ``best.yaml``.
- :mod:`~xm2.studies.windtunnel.transfer`: the wider model at the best values.
- :mod:`~xm2.studies.windtunnel.command`: ``windtunnel``, the function ``xm2 windtunnel`` runs,
  and a worker's search loop.

This package imports none of them: ``xm2 --help`` reads the command's docstring from its source.
"""
