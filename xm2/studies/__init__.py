"""Studies: experiments made of many training runs (coordinate check, µTransfer sweep, wind
tunnel, decay study). Each module holds one experiment; every run is built by :func:`xm2.run.run`,
the path ``xm2 fit`` uses, and logged as a child of the study's MLflow run
(:class:`xm2.tracking.runs.TrackedRun`)."""
